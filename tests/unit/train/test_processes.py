"""The trainer as users launch it: ``python -m fewstep train`` (SIGTERM → checkpoint, exit 0) and
``accelerate launch`` with two CPU processes (gloo DDP): both ranks end with identical weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch

from fewstep.train.checkpoint import checkpoint_dir, latest_checkpoint, load_trainable_weights
from tests.helpers import launch_two
from tests.helpers import subprocess_env as _env


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(make_recipe, write_recipe, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(
        make_recipe(run, train={"max_steps": 100_000, "checkpoint_every": 3, "keep_last": 100}),
        tmp_path / "recipe.yaml",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep", "train", str(recipe)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint_dir(run, 3) / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stopped_by_signal"] is True
    assert 3 <= summary["step"] < 100_000
    assert latest_checkpoint(run) == checkpoint_dir(run, summary["step"])
    assert "Stopped by a signal" in output


def test_two_processes_train_identical_weights(make_recipe, write_recipe, tmp_path):
    run = tmp_path / "run"
    steps, batch = 4, 4
    recipe = write_recipe(
        make_recipe(run, data={"batch_size": batch}, train={"max_steps": steps, "checkpoint_every": steps}),
        tmp_path / "recipe.yaml",
    )
    summary = launch_two(recipe, tmp_path)
    assert summary["world_size"] == 2 and summary["step"] == steps
    prints = summary["weight_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1], "the ranks diverged"

    ckpt = checkpoint_dir(run, steps)
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["world_size"] == 2 and meta["data_position"] == steps * batch * 2  # both shards consumed
    rng = [torch.load(ckpt / "rng" / f"rank_{r}.pt", weights_only=False)["torch"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1]), "each rank draws its own noise"
    weights = load_trainable_weights(ckpt)["student"]
    assert all(torch.isfinite(t).all() for t in weights.values())
