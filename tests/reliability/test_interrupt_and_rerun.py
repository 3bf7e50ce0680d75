"""Ctrl-C and reruns tell the truth: SIGINT writes a whole checkpoint of the current step and exits with status 130
(as a shell expects of an interrupted command), and `fewstep train` on a finished run says it is complete at its step
and exits 0 without loading anything or touching the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fewstep.cli.main import main
from fewstep.config import validate_recipe
from fewstep.config.load import dump_recipe
from fewstep.train.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, verify_checkpoint
from tests.helpers import (  # noqa: F401 (fixtures)
    digits_lora_recipe,
    fresh_accelerate_state,
    single_thread,
    subprocess_env,
)

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(path: Path, output_dir: Path, **train: object) -> Path:
    path.write_text(dump_recipe(validate_recipe(digits_lora_recipe(output_dir, **train))))
    return path


def test_ctrl_c_writes_a_whole_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", run, max_steps=100_000, checkpoint_every=3, keep_last=100)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep", "train", str(recipe)],
        env={**subprocess_env(tmp_path), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint_dir(run, 3) / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stopped_by_signal"] is True and summary["step"] >= 3
    newest = latest_checkpoint(run)
    assert newest == checkpoint_dir(run, summary["step"])  # the step it stopped at is saved
    verify_checkpoint(newest)  # every file listed in its manifest, with its sha256
    assert f"Stopped by a signal after step {summary['step']}" in err
    assert "run directory:" not in out  # an interrupted run does not claim to have finished


def test_a_finished_run_says_it_is_complete_and_loads_nothing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", run, max_steps=2, checkpoint_every=1)
    assert main(["train", str(recipe)]) == 0
    assert capsys.readouterr().out.count("run directory:") == 1
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run loaded its teacher")

    monkeypatch.setattr("fewstep.models.loading.load_pipeline", no_loading)
    assert main(["train", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert f"{run} is already complete at step 2 (train.max_steps=2): nothing to train" in out
    assert "Raise train.max_steps" in out and "Resuming" not in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]

    monkeypatch.undo()
    assert main(["train", str(recipe), "train.max_steps=3"]) == 0  # a higher max_steps trains on
    assert latest_checkpoint(run) == checkpoint_dir(run, 3)
    assert os.path.isfile(run / "run_summary.json")
