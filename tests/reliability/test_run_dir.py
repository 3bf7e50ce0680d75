"""One run per output directory, and a resumed run does what its recipe says: a second trainer is kept out by the
lock (its error names the holder's PID and host), ``train.resume=never`` on a used directory is refused unless
``--overwrite`` moves the earlier run aside, a launcher's copies that accelerate did not join are refused, and a
changed ``optim.lr`` on resume is the one used.

Every run is real and tiny: the shipped ``fewstep:digits-vp`` teacher with a rank-4 LoRA, a few steps on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.config import validate_recipe
from fewstep.config.load import dump_recipe, load_recipe
from fewstep.train.build import build_components
from fewstep.train.checkpoint import checkpoint_dir, latest_checkpoint, load_trainable_weights
from fewstep.train.lock import LOCK_FILE, RunDirError
from fewstep.train.loop import Trainer, make_accelerator, train
from tests.helpers import digits_lora_recipe, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def recipe_data(output_dir: Path, optim: dict[str, Any] | None = None, **train_changes: Any) -> dict[str, Any]:
    train = {"max_steps": 2, "checkpoint_every": 2, **train_changes}
    return digits_lora_recipe(output_dir, {"weight_decay": 0.0, **(optim or {})}, **train)


def make_recipe(output_dir: Path, optim: dict[str, Any] | None = None, **train_changes: Any):
    return validate_recipe(recipe_data(output_dir, optim, **train_changes))


def write_recipe(path: Path, output_dir: Path, **train_changes: Any) -> Path:
    path.write_text(dump_recipe(make_recipe(output_dir, **train_changes)))
    return path


def fewstep_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fewstep", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


# ---------------------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------------------


def test_a_second_trainer_is_refused_with_the_holders_pid(tmp_path):
    """Two trainers on one output_dir used to race (one resumed from the other's checkpoint). While one trainer holds
    the directory, ``fewstep train`` on it exits 2 naming the holder's PID and host, and touches nothing."""
    recipe = make_recipe(tmp_path / "run")
    first = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    try:
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        result = fewstep_cli("train", str(write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"in use by another trainer: PID {os.getpid()} on host {socket.gethostname()}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):  # in the same process too
            train(recipe)
        run = first.fit()  # the holder trains on; its lock is released when it ends
    finally:
        first.release_run_dir()
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    assert (run / LOCK_FILE).read_text() == ""
    train(make_recipe(run, max_steps=3))  # the next trainer gets the directory


def test_a_lock_left_by_a_killed_trainer_is_taken_over(tmp_path, caplog):
    """A trainer killed with SIGKILL leaves its lock file behind; the kernel released the lock itself, so the next
    trainer takes the directory over with a warning naming the dead PID (and refuses while it was alive)."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fewstep.train.lock import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"PID {holder.pid} on host"):
            train(make_recipe(run))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="fewstep.train.lock"):
        train(make_recipe(run))
    assert f"left by PID {holder.pid}" in caplog.text
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)


def test_a_start_that_fails_leaves_no_directory_behind(tmp_path):
    """The lock is taken before the teacher loads, in a directory made for it; when the start fails (here: an
    objective that does not fit the teacher) that directory goes away again instead of holding a stray lock file."""
    data = recipe_data(tmp_path / "run")
    data["objective"] = {"name": "lcm", "guidance_embedding": True}
    with pytest.raises(ValueError, match="does not fit"):
        train(validate_recipe(data))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# resume=never on a used directory
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_never_on_a_used_dir_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path):
    """``train.resume=never`` in a used output_dir used to prune the new run's checkpoints by step number, after which
    export, eval and resume silently used the old run. It is refused; ``fewstep train --overwrite`` renames the old
    run to ``<output_dir>.old-<time>`` unchanged, and the new run starts from step 0 in an empty directory."""
    run = train(make_recipe(tmp_path / "run", max_steps=4, checkpoint_every=2))
    before = tree_digest(run)
    recipe = write_recipe(tmp_path / "recipe.yaml", run, resume="never")

    with pytest.raises(RunDirError) as err:
        train(load_recipe(str(recipe)))
    assert "holds checkpoints of an earlier run" in str(err.value) and "--overwrite" in str(err.value)
    assert isinstance(err.value, ValueError)  # `fewstep train` reports it in one line with status 2
    assert tree_digest(run) == before

    moved = fewstep_cli("train", str(recipe), "--overwrite", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    (aside,) = tmp_path.glob("run.old-*")
    assert tree_digest(aside) == before  # the earlier run, whole
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000002"]
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["step"] == 2
    assert load_recipe(str(run / "resolved_config.yaml")).train.overwrite is True


# ---------------------------------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------------------------------


def test_torchrun_copies_without_accelerate_are_refused(tmp_path):
    """``torchrun`` without accelerate's CPU setup used to run independent jobs into one directory. A process that
    the launcher says is one of two (WORLD_SIZE=2), but that accelerate runs alone, exits 2 with the command that
    works, before the teacher loads."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
    result = fewstep_cli("train", str(recipe), cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert (
        "WORLD_SIZE=2" in result.stderr
        and "accelerate launch" in result.stderr
        and "ACCELERATE_USE_CPU=1" in (result.stderr)
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_real_torchrun_without_accelerate_is_refused_by_every_copy(tmp_path):
    """The same through ``torchrun --nproc_per_node 2`` on CPUs: accelerate joins a gloo group but reports one
    process, so each copy would have trained alone. The copies refuse (torchrun may stop the second once the first
    has exited) and nothing is written."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewstep",
               "train", str(recipe)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    refusals = [
        line for line in result.stderr.splitlines() if re.match(r"error: \[process \d of 2\] WORLD_SIZE=2 says", line)
    ]
    assert refusals, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Resuming with changed hyperparameters
# ---------------------------------------------------------------------------------------------------------------------


def test_a_changed_lr_on_resume_is_used(tmp_path, capsys):
    """A changed ``optim.lr`` on resume used to be recorded in resolved_config.yaml but not used (asked 0.05, used
    the checkpoint's). Now the optimizer carries the recipe's lr, weight decay, betas and eps, a note says what
    changed, and the first step's update is the one AdamW makes with the new lr (10 times the old one's)."""
    run = train(make_recipe(tmp_path / "run"))
    start = load_trainable_weights(checkpoint_dir(run, 2))["student"]

    def first_update(optim: dict[str, Any]) -> dict[str, torch.Tensor]:
        recipe = make_recipe(run, optim, max_steps=3, checkpoint_every=100)
        trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
        try:
            group = trainer.optimizers["student"].param_groups[0]
            assert group["lr"] == recipe.optim.lr and group["betas"] == tuple(recipe.optim.betas)
            assert group["eps"] == recipe.optim.eps and group["weight_decay"] == recipe.optim.weight_decay
            assert trainer.schedulers["student"].base_lrs == [recipe.optim.lr]
            scalars = trainer.train_step()
            assert scalars["lr/student"] == recipe.optim.lr
            module = trainer.acc.unwrap_model(trainer.modules["student"])
            weights = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
        finally:
            trainer.release_run_dir()
        return {k: weights[k] - start[k] for k in start}

    same = first_update({})
    assert "replace the checkpoint's" not in capsys.readouterr().err
    changed = first_update({"lr": 1e-2, "betas": [0.8, 0.99], "eps": 1e-6})
    note = capsys.readouterr().err
    assert "student lr 0.001 -> 0.01" in note and "student betas (0.9, 0.999) -> (0.8, 0.99)" in note
    changed_lr_only = first_update({"lr": 1e-2})
    assert all(
        torch.allclose(changed_lr_only[k], 10 * same[k], rtol=1e-3, atol=1e-6) for k in same
    )  # fp32 rounding of w
    assert any(float(same[k].abs().max()) > 0 for k in same)
    assert not all(torch.allclose(changed[k], changed_lr_only[k]) for k in same)  # betas and eps were applied too

    train(make_recipe(run, {"lr": 1e-2}, max_steps=3))  # through train(): what resolved_config.yaml says ran
    assert load_recipe(str(run / "resolved_config.yaml")).optim.lr == 1e-2
    state = torch.load(checkpoint_dir(run, 3) / "optimizers" / "student.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-2
