"""scripts/bench/ablation.py end to end on a tiny budget: two variants of the digits DMD2 recipe train 2 steps each,
the harness evaluates both students on 20 images, and the study's table and records are written into temporary files
(keeping what other benchmark scripts wrote there)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "scripts" / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


STUDY = """
title: tiny DMD2 study
recipe: bench/digits_dmd2
doc: docs/dmd.md
description: two variants, two steps each
set: [train.max_steps=2, train.progress=false, train.checkpoint_every=2, train.sample_every=1000, data.batch_size=8,
      objective.health_reference_steps=0]
num_images: 20
variants:
  - name: baseline
  - name: fake_lr
    set: [optim.group_lr.fake_score=1.0e-4]
    note: faster fake score
"""


def test_shipped_studies_load_and_name_real_recipes(ablation, tmp_path):
    studies = sorted((ROOT / "scripts" / "bench" / "ablations").glob("*.yaml"))
    assert studies, "no study files shipped"
    for path in studies:
        study = ablation.load_study(path)
        for variant in study.variants:  # every override is a valid recipe key for the base recipe
            bench = ablation.variant_recipe(study, path.stem, variant, tmp_path)
            assert bench.cfg.output_dir == str(tmp_path / path.stem / variant.name)


def test_tiny_study_trains_evaluates_and_writes_its_table(ablation, tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY)
    doc, js = tmp_path / "dmd.md", tmp_path / "results.json"
    doc.write_text("# DMD\n\nhand-written text\n")
    teacher = {"benchmark": "quality", "dataset": "digits", "kind": "teacher", "teacher": "fewstep:digits-vp",
               "steps": 50, "fid": 1.2, "class_accuracy": 1.0, "diversity": 4.0}  # fmt: skip
    js.write_text(json.dumps({"rows": [teacher]}))
    argv = [str(study), "--runs-dir", str(tmp_path / "runs"), "--results-json", str(js), "--doc", str(doc),
            "--eval-batch-size", "10"]  # fmt: skip
    assert ablation.main(argv) == 0

    rows = json.loads(js.read_text())["rows"]
    assert rows[0] == teacher  # the quality rows are kept
    mine = [r for r in rows if r["benchmark"] == "ablation"]
    assert [(r["variant"], r["student_steps"]) for r in mine] == [("baseline", 1), ("fake_lr", 1)]
    for r in mine:
        assert r["study"] == "tiny" and r["num_images"] == 20 and r["training_steps"] == 2
        assert r["fid"] > 0 and 0 <= r["class_accuracy"] <= 1 and r["diversity"] > 0
        assert r["training_seconds"] > 0
    assert mine[1]["overrides"][-1] == "optim.group_lr.fake_score=1.0e-4"

    text = doc.read_text()
    assert text.startswith("# DMD\n\nhand-written text\n")
    table = text.split("<!-- ablation_tiny:start -->")[1].split("<!-- ablation_tiny:end -->")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert lines[0].startswith("| variant | change | steps | FID ↓ | Δ FID")
    baseline, fake = lines[1].split(" | "), lines[2].split(" | ")
    assert baseline[4] == "+0.00" and fake[1] == "`optim.group_lr.fake_score=1.0e-4`"
    assert fake[0] == "| fake_lr: faster fake score"
    assert "the teacher at 50 steps measures FID 1.20" in table

    # a second call reuses the finished runs and replaces the records instead of adding rows
    seconds = {r["variant"]: r["training_seconds"] for r in mine}
    assert ablation.main([*argv, "--variants", "fake_lr", "--eval-only"]) == 0
    again = [r for r in json.loads(js.read_text())["rows"] if r["benchmark"] == "ablation"]
    assert len(again) == 2 and {r["variant"]: r["training_seconds"] for r in again} == seconds


def test_unknown_variant_is_refused(ablation, tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY)
    with pytest.raises(SystemExit, match="no variant named nope"):
        ablation.main([str(study), "--variants", "nope", "--runs-dir", str(tmp_path / "runs")])


def test_a_run_stopped_before_max_steps_is_not_evaluated(ablation, tmp_path, monkeypatch):
    """A run stopped early (here: trained to step 1 of 2, as a signal would leave it) is refused with how to resume,
    and the same call later resumes it to ``train.max_steps``."""
    import fewstep.train.loop as loop

    study_path = tmp_path / "tiny.yaml"
    study_path.write_text(STUDY)
    study = ablation.load_study(study_path)
    bench = ablation.variant_recipe(study, "tiny", study.variants[0], tmp_path / "runs")
    real_train = loop.train

    def stopped_at_step_1(cfg, **kwargs):
        return real_train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 1})}), **kwargs)

    monkeypatch.setattr(loop, "train", stopped_at_step_1)
    with pytest.raises(SystemExit, match="stopped at step 1 of train.max_steps=2.*resumes it"):
        ablation.train_or_reuse(bench, False, torch.device("cpu"))
    assert not ablation.finished(bench)
    log = Path(bench.cfg.output_dir) / "bench_training.json"
    first = json.loads(log.read_text())
    assert first["steps"] == 1 and first["training_seconds"] > 0

    monkeypatch.setattr(loop, "train", real_train)
    run_dir, seconds, _ = ablation.train_or_reuse(bench, False, torch.device("cpu"))
    assert ablation.finished(bench) and seconds > first["training_seconds"]  # the resumed run's time adds up
    resumed = json.loads((run_dir / "bench_training.json").read_text())
    assert resumed == {**first, "steps": 2, "training_seconds": seconds}
