"""Checkpoints: keep-last-K, atomic layout, resume from a path, and the errors for corrupt or missing checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.config.errors import RecipeError
from fewstep.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainable_weights,
)
from fewstep.train.lock import RunDirError
from fewstep.train.loop import train
from fewstep.train.manifest import MANIFEST


def test_keep_last_and_layout(make_recipe, tmp_path):
    run = train(make_recipe(tmp_path / "run", train={"max_steps": 5, "checkpoint_every": 1, "keep_last": 2}))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000005"]
    assert not list((run / "checkpoints").glob(".tmp_*"))
    ckpt = latest_checkpoint(run)
    files = ("trainable/student.safetensors", "optimizers/student.pt", "objective.pt", "rng/rank_0.pt", MANIFEST)
    for name in (*files, COMPLETE):
        assert (ckpt / name).is_file(), name
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["step"] == 5 and meta["data_position"] == 5 * 8 and meta["world_size"] == 1
    assert (run / "resolved_config.yaml").is_file()
    assert list((run / "fewstep").glob("events.out.tfevents.*")), "tensorboard scalars"


def test_corrupt_checkpoint_names_the_file_and_the_fix(make_recipe, tmp_path):
    """A checkpoint without a manifest (an older fewstep) cannot be verified up front: a garbled file is still
    refused when it is read, with the file and the fix named."""
    run = train(make_recipe(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 2}))
    (checkpoint_dir(run, 4) / MANIFEST).unlink()
    bad = checkpoint_dir(run, 4) / "trainable" / "student.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError) as err:
        train(make_recipe(tmp_path / "run", train={"max_steps": 6, "checkpoint_every": 2}))
    message = str(err.value)
    assert str(bad) in message and "corrupt" in message
    assert "Delete" in message and "train.resume=never" in message

    # Following the fix: without the corrupt checkpoint the run continues from the previous one.
    import shutil

    shutil.rmtree(checkpoint_dir(run, 4))
    train(make_recipe(tmp_path / "run", train={"max_steps": 6, "checkpoint_every": 2}))
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(checkpoint_dir(run, 2)) and summary["step"] == 6


def test_missing_file_in_checkpoint(make_recipe, tmp_path):
    run = train(make_recipe(tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2}))
    missing = checkpoint_dir(run, 2) / "optimizers" / "student.pt"
    missing.unlink()
    with pytest.raises(CheckpointError, match="but missing") as err:
        train(make_recipe(tmp_path / "run", train={"max_steps": 4}))
    assert str(missing) in str(err.value) and "start over" in str(err.value)
    assert "No earlier checkpoint of this run is intact" in str(err.value)


def test_resume_from_missing_path(make_recipe, tmp_path):
    nowhere = tmp_path / "no" / "checkpoints" / "step_00000002"
    with pytest.raises(RecipeError, match="train.resume: is neither auto, never nor an existing checkpoint"):
        train(make_recipe(tmp_path / "run", train={"resume": str(nowhere)}))  # checked before the teacher loads
    assert not (tmp_path / "run").exists()


def test_resume_from_explicit_path_and_mismatched_student(make_recipe, tmp_path):
    source = train(make_recipe(tmp_path / "a", train={"max_steps": 4, "checkpoint_every": 2}))
    ckpt = checkpoint_dir(source, 2)
    run = train(make_recipe(tmp_path / "b", train={"max_steps": 3, "resume": str(ckpt)}))
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(ckpt) and summary["step"] == 3
    weights = load_trainable_weights(latest_checkpoint(run))["student"]
    assert all(torch.isfinite(t).all() for t in weights.values())

    lora = {"kind": "lora", "lora": {"rank": 4}}
    with pytest.raises(CheckpointError, match="does not match the model being loaded.*num_elements"):
        train(make_recipe(tmp_path / "c", student=lora, train={"max_steps": 3, "resume": str(ckpt)}))


def test_resume_never_starts_over(make_recipe, tmp_path):
    """``resume: never`` on a used output_dir starts over only with ``overwrite``, after moving the old run aside."""
    run = train(make_recipe(tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2}))
    never = {"max_steps": 2, "checkpoint_every": 2, "resume": "never"}
    with pytest.raises(RunDirError, match="holds checkpoints of an earlier run"):
        train(make_recipe(tmp_path / "run", train=never))
    train(make_recipe(tmp_path / "run", train={**never, "overwrite": True}))
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["step"] == 2
    (aside,) = tmp_path.glob("run.old-*")
    assert (checkpoint_dir(aside, 2) / "COMPLETE").is_file()
