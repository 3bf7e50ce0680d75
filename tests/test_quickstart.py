"""The quickstart end to end on a CPU: a few LCM steps on the shipped digits teacher, then the table and the grid."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from PIL import Image

from fewstep.cli import quickstart as cli
from fewstep.eval import quickstart as qs


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fewstep")
    cli.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


def test_quickstart_trains_evaluates_and_writes_table_and_grid(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=null", "train.progress=false"]
    args = _parse(["quickstart", *overrides, f"output_dir={run_dir}", "--num-images", "40"])
    assert args.recipe == qs.DEFAULT_RECIPE and args.teacher_steps == [1, 2, 4, 50]
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "4-step student" in out
    header = "| model | steps | FID ↓ | accuracy ↑ | s / 1,000 images |\n| --- | ---: | ---: | ---: | ---: |\n"
    assert header in out

    table = (run_dir / qs.TABLE_FILE).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[2].strip() for r in rows] == ["–", "1", "2", "4", "50", "1", "2", "4"]
    assert rows[1].startswith("| teacher (DDIM, w=2)") and rows[-1].startswith("| student (LCM)")
    assert "digits train split" in table and "w = 2" in table

    result = json.loads((run_dir / qs.JSON_FILE).read_text())
    assert result["checkpoint"].endswith("step_00000004")
    assert list(result["rows"][0]) == ["model", "num_steps", "fid", "accuracy", "seconds_per_1k_images", "num_images"]
    for row in result["rows"]:
        assert math.isfinite(row["fid"]) and row["fid"] >= 0 and 0 <= row["accuracy"] <= 1
        assert row["seconds_per_1k_images"] is None or math.isfinite(row["seconds_per_1k_images"])
    assert {r["num_images"] for r in result["rows"][1:]} == {40}

    grid = Image.open(run_dir / qs.GRID_FILE)
    pitch = 8 * qs.GRID_SCALE + qs.GRID_GAP  # rows: real digits + 4 teacher rows + 3 student rows
    assert grid.size == (qs.GRID_IMAGES * pitch + qs.GRID_GAP, 8 * pitch + qs.GRID_GAP)

    # --eval-only re-evaluates the same checkpoint without training, at other step counts.
    again = qs.quickstart(
        qs.DEFAULT_RECIPE, [f"output_dir={run_dir}"], num_images=20, teacher_steps=[2], student_steps=[1], train=False
    )
    assert [(r.model.split()[0], r.num_steps) for r in again.rows] == [("digits", None), ("teacher", 2), ("student", 1)]
    assert again.train_seconds < 5


def test_quickstart_rejects_non_digits_recipes_and_empty_runs(tmp_path):
    with pytest.raises(ValueError, match="data.source is 'prompts'"):
        qs.quickstart(overrides=["data.source=prompts", "data.prompts=[a cat]", f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="without --eval-only"):
        qs.quickstart(overrides=[f"output_dir={tmp_path / 'empty'}"], train=False)
    with pytest.raises(SystemExit):
        _parse(["quickstart", "--student-steps", "0,x"])


@pytest.mark.slow
def test_a_short_distillation_beats_the_teacher_at_four_steps(tmp_path):
    """200 LCM steps (~25 s on 2 cores) already put the 4-step student ahead of the 4-step teacher."""
    overrides = ["train.max_steps=200", "train.sample_every=null", "train.progress=false", f"output_dir={tmp_path}"]
    result = qs.quickstart(overrides=overrides, num_images=500, teacher_steps=[4], student_steps=[4])
    _, teacher, student = result.rows
    assert (teacher.num_steps, student.num_steps) == (4, 4)
    assert student.metrics["fid"] < 0.75 * teacher.metrics["fid"], qs.verdict(result.rows)
    assert student.metrics["accuracy"] > 0.95
    assert "beats" in qs.verdict(result.rows)
