"""``fewstep.eval.curves``: TensorBoard's smoothing, event files of a resumed run, evenly spaced steps, recipe
differences, and ``scripts/curves.py`` writing a small PNG from real event files."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from fewstep.eval.curves import MISSING, Curve, even_steps, read_curves, recipe_diff, smooth

REPO = Path(__file__).resolve().parents[3]


def test_smoothing_is_tensorboards_debiased_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # a constant stays itself
    assert smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 0.25 / 0.75])  # (0.5·0.5 + 0.5·0) / (1 − 0.5²)
    assert smooth([1.0, 0.0], 0.0) == [1.0, 0.0]
    out = smooth([1.0, math.nan, 3.0], 0.5)  # a NaN passes through and stays out of the average
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx((0.25 + 1.5) / 0.75)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        smooth([1.0], 1.0)


def write_events(log_dir: Path, points: list[tuple[int, float]], start_time: float) -> None:
    writer = SummaryWriter(str(log_dir))
    for k, (step, value) in enumerate(points):
        writer.add_scalar("loss", value, step, walltime=start_time + k)
    writer.close()


def test_a_resumed_run_keeps_the_values_logged_after_the_resume(tmp_path):
    log_dir = tmp_path / "run" / "fewstep"
    write_events(log_dir, [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)], start_time=1000.0)
    write_events(log_dir, [(3, 30.0), (4, 40.0), (5, 50.0)], start_time=2000.0)  # resumed from step 2
    curve = read_curves(tmp_path / "run")["loss"]
    assert curve.steps == [1, 2, 3, 4, 5] and curve.values == [1.0, 2.0, 30.0, 40.0, 50.0]
    assert curve.last == (5, 50.0) and curve.exact(3) == 30.0 and curve.exact(7) is None


def test_values_at_evenly_spaced_steps():
    curve = Curve("loss", [10, 20, 30, 40], [4.0, 3.0, 2.0, 1.0])
    assert even_steps([curve], 3) == [10, 25, 40]
    assert even_steps([curve, Curve("x", [50], [0.0])], 5) == [10, 20, 30, 40, 50]
    assert curve.at(25, 0.0) == 3.0  # the last logged step at or before 25
    assert curve.at(5) is None and curve.at(41) is None  # outside the logged range
    assert curve.at(40) == pytest.approx(smooth(curve.values)[-1])


def test_recipe_diff_lists_changed_added_and_removed_keys_by_dotted_path():
    a = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "train": {"max_steps": 4}, "eval": {"every_steps": None}}
    b = {"optim": {"lr": 3e-3, "betas": [0.9, 0.999]}, "train": {"max_steps": 4, "seed": 1}}
    assert recipe_diff(a, b) == [
        ("eval.every_steps", None, MISSING),
        ("optim.lr", 1e-3, 3e-3),
        ("train.seed", MISSING, 1),
    ]


def test_the_curves_script_writes_a_small_png_of_the_objectives_health_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "digits_scm"
    (run).mkdir()
    (run / "resolved_config.yaml").write_text("objective: {name: scm}\n")
    writer = SummaryWriter(str(run / "fewstep"))
    for step in range(1, 41):
        writer.add_scalar("loss", 1.0 / step, step)
        writer.add_scalar("metrics/scm_mse", 2.0 / step, step)
        writer.add_scalar("metrics/g_norm", 15.0, step)
        if step % 20 == 0:
            writer.add_scalar("eval/fid@1", 10.0 - step / 10, step)
    writer.close()
    spec = importlib.util.spec_from_file_location("curves_script", REPO / "scripts" / "curves.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tags = script.curve_tags("scm", set(read_curves(run)))
    assert tags == ["metrics/scm_mse", "loss", "metrics/g_norm", "eval/fid@1"]
    assert script.main([str(run), "--out-dir", str(tmp_path / "docs")]) == 0
    png = tmp_path / "docs" / "digits_scm.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 100_000
    assert str(png) in capsys.readouterr().out
