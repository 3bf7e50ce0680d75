"""``fewstep compare``: two tiny real digits runs (LoRA, the diffusion objective, different learning rates) side by
side: curve tables, final values, the eval report, the recipe difference and the PNG; bad input as one error line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fewstep.cli.main import main
from fewstep.config import validate_recipe
from fewstep.eval.curves import read_curves, smooth
from fewstep.eval.periodic import periodic_evaluator
from fewstep.train.loop import train
from tests.helpers import digits_lora_recipe, fresh_accelerate_state, one_error, single_thread  # noqa: F401

STEPS = 21  # more than fewstep.eval.curves.SPARSE_POINTS: the loss is a smoothed curve


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Run A: lr 1e-3; run B: lr 3e-3 with an accuracy evaluation every 10 steps. 21 steps each, every step logged."""
    root = tmp_path_factory.mktemp("compare")
    common = dict(max_steps=STEPS, checkpoint_every=STEPS, log_every=1)
    a = digits_lora_recipe(root / "a", **common)
    b = digits_lora_recipe(root / "b", {"lr": 3e-3}, **common)
    b["eval"] = {"every_steps": 10, "steps": [1], "num_samples": 20, "metrics": ["accuracy"], "batch_size": 20}
    return train(validate_recipe(a)), train(validate_recipe(b), evaluator=periodic_evaluator)


def test_compare_prints_both_curves_the_finals_the_report_and_the_lr_difference(runs, tmp_path, capsys):
    a, b = runs
    png = tmp_path / "plots" / "ab.png"
    assert main(["compare", str(a), str(b), "--metrics", "loss,grad_norm/student", "--points", "4",
                 "--out", str(png)]) == 0  # fmt: skip
    out = capsys.readouterr().out

    loss_a, loss_b = read_curves(a)["loss"], read_curves(b)["loss"]
    assert loss_a.steps == loss_b.steps == list(range(1, STEPS + 1))
    assert loss_a.values != loss_b.values  # another learning rate, another run
    table = out.split("loss (smoothed, weight 0.6)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split() == ["step", "A", "B"]
    steps = [int(line.split()[0]) for line in table[1:]]
    assert steps == [1, 8, 14, 21]  # 4 evenly spaced steps over 1..21
    last = table[-1].split()  # the smoothed value at the last step, for both runs
    assert [float(v) for v in last[1:]] == pytest.approx(
        [smooth(loss_a.values)[-1], smooth(loss_b.values)[-1]], rel=1e-3
    )
    first = table[1].split()  # the debiased average starts at the first raw value
    assert float(first[1]) == pytest.approx(loss_a.values[0], rel=1e-3)
    assert "grad_norm/student (smoothed, weight 0.6)" in out

    finals = out.split("final values (raw, at the last logged step)\n", 1)[1].split("\n\n", 1)[0]
    assert f"{loss_a.values[-1]:.4g} @ {STEPS}" in finals and f"{loss_b.values[-1]:.4g} @ {STEPS}" in finals

    assert "eval report A: none" in out
    report_b = out.split("eval report B: ", 1)[1].split("\n\n", 1)[0]
    assert report_b.startswith(str(b / "eval" / "step_00000020" / "eval.json"))  # the newest periodic evaluation
    assert "| student (diffusion, raw) | 1 | 1 |" in report_b

    diff = out.split("recipe differences (resolved_config.yaml)\n", 1)[1].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in diff[1:] if line.strip()}
    assert rows["optim.lr"] == ["0.001", "0.003"]
    assert rows["eval.every_steps"] == ["null", "10"]
    assert "train.max_steps" not in rows  # equal values are not listed

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < png.stat().st_size < 200_000
    assert f"plot: {png}" in out


def test_default_metrics_are_the_loss_and_the_evaluations_both_runs_logged(runs, capsys):
    a, b = runs
    assert main(["compare", str(b), str(b)]) == 0
    out = capsys.readouterr().out
    assert "loss (smoothed, weight 0.6)" in out
    eval_table = out.split("eval/accuracy@1 (raw, every logged step)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in eval_table[1:]] == ["10", "20"]  # the evaluated steps, not a smoothed grid
    assert "recipe differences (resolved_config.yaml): none" in out
    assert main(["compare", str(a), str(b)]) == 0  # A has no evaluation: only the loss
    out = capsys.readouterr().out
    assert "loss (smoothed" in out and "eval/accuracy@1 (" not in out


def test_a_directory_without_event_files_is_one_error_line(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["compare", str(runs[0]), str(empty)]) == 2
    one_error(capsys.readouterr().err, str(empty), "no TensorBoard event files", "output_dir")
    assert main(["compare", str(tmp_path / "missing"), str(runs[0])]) == 2
    one_error(capsys.readouterr().err, "missing", "not a directory")


def test_a_metric_neither_run_logged_is_one_error_line_naming_what_they_logged(runs, capsys):
    assert main(["compare", *map(str, runs), "--metrics", "loss,metrics/nope"]) == 2
    one_error(capsys.readouterr().err, "neither run logged metrics/nope", "grad_norm/student")


def test_a_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "x.png")]) == 2
    one_error(capsys.readouterr().err, "matplotlib", "pip install 'fewstep[plots]'")
    assert not (tmp_path / "x.png").exists()
