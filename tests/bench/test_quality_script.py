"""scripts/bench/quality.py end to end on a tiny budget: the digits LCM recipe trains 2 steps, the harness evaluates
teacher and student on 20 images, and docs-style results.md / results.json are written into a temporary directory
(keeping what other benchmark scripts wrote there)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fewstep.config.errors import RecipeError
from fewstep.data.reflow.pairs import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
SPEC_FIELDS = ("dataset", "teacher", "objective", "student_steps", "nfe", "fid", "class_accuracy",
               "training_seconds", "hardware", "date")  # fmt: skip


def load_script():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return load_script()


def test_discovery_follows_the_naming_convention(quality, tmp_path):
    recipes, uncovered = quality.discover(ROOT / "recipes" / "bench", None, None, [])
    names = {r.path.stem: (r.dataset, r.objective) for r in recipes}
    assert names["digits_lcm"] == ("digits", "lcm") and names["fashion_flow_lcm"] == ("fashion_mnist", "lcm")
    assert "lcm" not in uncovered
    only, _ = quality.discover(ROOT / "recipes" / "bench", ["fashion"], ["lcm"], [], tmp_path, None)
    assert sorted(r.path.stem for r in only) == ["fashion_flow_lcm", "fashion_lcm"]
    assert all(r.cfg.output_dir == str(tmp_path / r.path.stem) for r in only)
    bad = tmp_path / "recipes"
    bad.mkdir()
    (bad / "digits_consistency.yaml").write_text((ROOT / "recipes" / "bench" / "digits_lcm.yaml").read_text())
    with pytest.raises(ValueError, match=r"<dataset>\[_<variant>\]_<objective>\.yaml"):
        quality.discover(bad, None, None, [])


def test_overrides_apply_to_the_chosen_recipes_and_what_they_need(quality, tmp_path):
    """`--recipes R --set objective.<key>=…` names keys that only R's objective has: the other recipes are not loaded
    with it; a recipe that trains on another's exported run (InstaFlow on 2-RF) brings that recipe along."""
    bench = ROOT / "recipes" / "bench"
    with pytest.raises(RecipeError, match="segments"):  # what loading every recipe with it would do
        quality.discover(bench, None, None, ["objective.segments=2"])
    (pcm,), _ = quality.discover(bench, None, None, ["objective.segments=2"], tmp_path, ["fashion_pcm"])
    assert pcm.cfg.objective.segments == 2
    chosen, _ = quality.discover(bench, None, None, [], tmp_path, ["digits_flow_instaflow"])
    every = quality.with_requirements(chosen, bench, [], tmp_path)
    assert sorted(every) == ["digits_flow_instaflow", "digits_flow_reflow"]


def test_tiny_end_to_end_run_writes_well_formed_rows(quality, tmp_path):
    md, js = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results.json"
    md.parent.mkdir()
    md.write_text("# Results\n\n<!-- speed:start -->\nspeed table\n<!-- speed:end -->\n")
    js.write_text(json.dumps({"rows": [{"benchmark": "speed", "family": "sd15", "ratio": 9.0}]}))
    argv = ["--recipes", "digits_lcm", "--max-steps", "2", "--num-images", "20", "--teacher-steps", "1,2",
            "--student-steps", "1,2", "--eval-batch-size", "10", "--out-dir", str(tmp_path / "out"),
            "--results-md", str(md), "--results-json", str(js), "--set", "train.progress=false"]  # fmt: skip
    assert quality.main(argv) == 0

    rows = json.loads(js.read_text())["rows"]
    assert rows[0] == {"benchmark": "speed", "family": "sd15", "ratio": 9.0}  # other benchmarks' rows are kept
    quality_rows = [r for r in rows if r["benchmark"] == "quality"]
    assert [(r["kind"], r["steps"]) for r in quality_rows] == [
        ("data", None), ("student", 1), ("student", 2), ("teacher", 1), ("teacher", 2)
    ]  # fmt: skip
    for r in quality_rows:
        assert set(SPEC_FIELDS) <= set(r) and r["dataset"] == "digits" and r["hardware"].startswith(("CPU", "GPU"))
        assert r["fid"] >= 0 and 0 <= r["class_accuracy"] <= 1 and r["num_images"] == 20
    student = [r for r in quality_rows if r["kind"] == "student"]
    teacher = [r for r in quality_rows if r["kind"] == "teacher"]
    assert all(r["objective"] == "lcm" and r["teacher"] == "fewstep:digits-vp" for r in student)
    assert [r["student_steps"] for r in student] == [1, 2] and [r["nfe"] for r in student] == [1.0, 2.0]
    assert [r["nfe"] for r in teacher] == [2.0, 4.0]  # CFG: two network evaluations per step
    assert all(r["training_seconds"] > 0 and r["training_steps"] == 2 for r in student)
    assert all(r["student_steps"] is None and r["training_seconds"] is None for r in teacher)
    assert teacher[1]["fid"] < 30 and teacher[1]["class_accuracy"] >= 0.9  # the shipped teacher makes digits

    text = md.read_text()
    assert "<!-- speed:start -->\nspeed table\n<!-- speed:end -->" in text  # the other section is intact
    section = text.split("<!-- quality:start -->")[1].split("<!-- quality:end -->")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| teacher | model | steps | NFE | FID ↓ | accuracy ↑")
    assert len(table) == 2 + len(quality_rows)
    assert "| `fewstep:digits-vp` | student (lcm, raw) | 2 | 2 |" in section
    assert (tmp_path / "out" / "eval" / "digits_lcm" / "eval.json").is_file()

    assert quality.main(argv) == 0  # a second run reuses the finished run and replaces its own rows
    again = json.loads(js.read_text())["rows"]
    assert len(again) == len(rows) and text.count("<!-- quality:start -->") == 1
    reused = [r["training_seconds"] for r in again if r.get("kind") == "student"]
    assert reused == [r["training_seconds"] for r in student]  # read back from the run, not retrained


def test_teachers_only_remeasures_teacher_rows_with_the_new_columns_and_keeps_the_students(quality, tmp_path):
    """An old student row (before precision / recall / diversity existed) is kept with `–` cells; the teacher rows
    get real numbers and the diversity ratio to the teacher's most steps; no run is trained."""
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    old = {"benchmark": "quality", "dataset": "digits", "teacher": "fewstep:digits-vp", "objective": "lcm",
           "student_steps": 1, "nfe": 1.0, "fid": 1.67, "class_accuracy": 0.98, "training_seconds": 782,
           "hardware": "CPU: old", "date": "2026-11-30", "kind": "student", "model": "student (lcm, raw)", "steps": 1,
           "num_images": 1000, "seconds_per_image": 0.001, "recipe": "recipes/bench/digits_lcm.yaml"}  # fmt: skip
    js.write_text(json.dumps({"rows": [old]}))
    argv = ["--recipes", "digits_lcm", "--teachers-only", "--num-images", "20", "--teacher-steps", "1,4",
            "--eval-batch-size", "10", "--out-dir", str(tmp_path / "out"), "--results-md", str(md),
            "--results-json", str(js)]  # fmt: skip
    assert quality.main(argv) == 0
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained
    rows = json.loads(js.read_text())["rows"]
    assert rows[0] == old and [(r["kind"], r["steps"]) for r in rows[1:]] == [("data", None), ("teacher", 1),
                                                                             ("teacher", 4)]  # fmt: skip
    for r in rows[1:]:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["diversity"] > 0
    section = md.read_text().split("<!-- quality:start -->")[1]
    assert "| FID ↓ | accuracy ↑ | precision ↑ | recall ↑ | diversity | diversity / teacher | ms / image |" in section
    assert "| `fewstep:digits-vp` | student (lcm, raw) | 1 | 1 | 1.67 | 0.980 | – | – | – | – | 1 | 782 |" in section
    assert f"| 1.00 | {rows[3]['seconds_per_image'] * 1000:.3g} | – |" in section  # the teacher at 4 steps: ratio 1


def test_reflow_recipes_get_their_data_set_pairs_and_upstream_run(quality, tmp_path):
    recipes, _ = quality.discover(
        ROOT / "recipes" / "bench", ["digits"], ["reflow", "instaflow"], [], tmp_path / "runs"
    )
    by = {r.path.stem: r for r in recipes}
    assert {"digits_flow_reflow", "digits_flow_instaflow", "digits_flow_slim_reflow"} <= set(by)
    assert all(r.dataset == "digits" and r.cfg.data.source == "pairs" for r in by.values())
    assert by["digits_flow_reflow"].cfg.data.path == by["digits_flow_slim_reflow"].cfg.data.path  # shared pairs
    assert by["digits_flow_reflow"].cfg.data.path == str(tmp_path / "pairs" / "digits_flow")
    insta = by["digits_flow_instaflow"]
    assert insta.requires == "digits_flow_reflow" and by["digits_flow_reflow"].requires is None
    assert insta.cfg.teacher.pretrained == str(tmp_path / "runs" / "digits_flow_reflow" / "export")


def test_model_column_names_the_variant_and_a_smaller_students_size(quality):
    row = {"kind": "student", "model": "student (reflow, ema)", "objective": "reflow", "parameters": 178_000,
           "recipe": "recipes/bench/digits_flow_slim_reflow.yaml", "teacher_parameters": 703_000}  # fmt: skip
    assert quality.model_cell(row) == "student (reflow, ema) · slim, 0.178M params (teacher 0.703M)"
    plain = dict(row, recipe="recipes/bench/digits_flow_reflow.yaml", parameters=703_000)
    assert quality.model_cell(plain) == "student (reflow, ema)"
    dmd = {
        "kind": "student",
        "model": "student (dmd2, raw)",
        "objective": "dmd2",
        "recipe": "recipes/bench/digits_4step_dmd2.yaml",
    }
    assert quality.model_cell(dmd) == "student (dmd2, raw) · 4step"
    assert quality.model_cell({"kind": "teacher", "model": "teacher (DDIM, w=2)"}) == "teacher (DDIM, w=2)"


def test_the_instaflow_chain_writes_pairs_exports_the_2rf_run_and_evaluates(quality, tmp_path):
    """Tiny budget: reflow pairs, 2-RF training and export, the 2-RF model's own pairs, InstaFlow, its 1-step row."""
    js = tmp_path / "results.json"
    argv = ["--recipes", "digits_flow_instaflow", "--max-steps", "2", "--num-images", "10", "--num-pairs", "16",
            "--pair-steps", "2", "--eval-batch-size", "10", "--out-dir", str(tmp_path / "out"), "--no-teacher",
            "--no-real", "--results-md", str(tmp_path / "results.md"), "--results-json", str(js),
            "--set", "train.progress=false"]  # fmt: skip
    assert quality.main(argv) == 0
    assert json.loads((tmp_path / "out" / "pairs" / "digits_flow" / MANIFEST).read_text())["complete"]
    assert (tmp_path / "out" / "runs" / "digits_flow_reflow" / "export" / "model_index.json").is_file()
    assert json.loads((tmp_path / "out" / "pairs" / "digits_flow_2rf" / MANIFEST).read_text())["complete"]
    rows = json.loads(js.read_text())["rows"]
    assert [(r["kind"], r["objective"], r["steps"], r["teacher"]) for r in rows] == [
        ("student", "instaflow", 1, "digits_flow_reflow (exported run)")
    ]  # --no-teacher and --no-real: neither teacher nor test-split rows
