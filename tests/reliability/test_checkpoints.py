"""Checkpoints never run code, are verified against their manifest and their model, load with exact shapes, and are
written and pruned so that a kill at any moment leaves only whole checkpoints behind.

Every test trains a real tiny run (the shipped ``fewstep:digits-vp`` teacher, a rank-4 LoRA, a few steps on the CPU)
and damages its files on disk the way a bad disk, an older fewstep, another program or an attacker would.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fewstep.config.load import dump_recipe, validate_recipe
from fewstep.eval.targets import run_target
from fewstep.export.run import export_run
from fewstep.objectives import OBJECTIVES
from fewstep.train.build import Components, build_components, objective_config
from fewstep.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    CorruptCheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainable_weights,
    verify_checkpoint,
)
from fewstep.train.ema import EMA
from fewstep.train.loop import Trainer, make_accelerator, train
from fewstep.train.manifest import MANIFEST, read_manifest, write_manifest
from fewstep.train.run import load_run
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)


def make_recipe(output_dir: Path, rank: int = 4, teacher: str = "fewstep:digits-vp", **train_changes: Any):
    data = {
        "teacher": {"pretrained": teacher},
        "student": {"kind": "lora", "lora": {"rank": rank}},
        "objective": {"name": "diffusion"},
        "data": {"source": "digits", "batch_size": 8},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "checkpoint_every": 2, "keep_last": 5, "sample_every": None, "progress": False,
                  "resume": "auto", **train_changes},
        "output_dir": str(output_dir),
    }  # fmt: skip
    return validate_recipe(data)


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "run_summary.json").read_text())


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # in the tensor data, past the safetensors header
    path.write_bytes(bytes(data))


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker (or a buggy writer) does after changing a file: hash the files again, same fingerprint."""
    write_manifest(ckpt, read_manifest(ckpt)["fingerprint"], "checkpoint", exclude=(COMPLETE,))


class Payload:
    """A pickle that creates ``marker`` when it is unpickled (``torch.load(weights_only=False)`` would run it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------------------------
# No pickle on resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["objective.pt", "optimizers/student.pt", "rng/rank_0.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(planted, tmp_path):
    """A pickled payload planted in a run directory used to run on the next resume (checkpoints were loaded with
    ``weights_only=False``). Now the changed file fails its sha256; with the manifest rewritten to match, the file is
    still read with ``weights_only=True`` and refused unread, with the file named."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    target = checkpoint_dir(run, 2) / planted
    marker = tmp_path / "payload_ran"
    torch.save({"state": Payload(marker)}, target)

    control = tmp_path / "control.pt"  # the payload is live: an unsafe load runs it
    torch.save({"state": Payload(tmp_path / "control_ran")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control_ran").exists()

    with pytest.raises(CorruptCheckpointError, match="does not match its sha256") as err:
        train(make_recipe(tmp_path / "run", max_steps=4))
    assert str(target) in str(err.value)
    assert not marker.exists()

    rewrite_manifest(checkpoint_dir(run, 2))
    with pytest.raises(CheckpointError) as err:
        train(make_recipe(tmp_path / "run", max_steps=4))
    message = str(err.value)
    assert str(target) in message and "fewstep never writes such content" in message
    assert "changed or written by other software" in message and "could run code" in message
    assert not marker.exists()
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)  # nothing was trained or written


def test_every_checkpoint_file_loads_with_weights_only(tmp_path):
    """Optimizer, LR-schedule, RNG and objective states are tensors and plain values: ``weights_only=True`` reads
    them, and numpy's RNG state comes back exactly."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    ckpt = checkpoint_dir(run, 2)
    for path in sorted(ckpt.rglob("*.pt")):
        torch.load(path, weights_only=True)
    rng = torch.load(ckpt / "rng" / "rank_0.pt", weights_only=True)
    assert isinstance(rng["numpy"]["keys"], torch.Tensor) and rng["numpy"]["keys"].shape == (624,)
    from fewstep.train.checkpoint import rng_state, set_rng_state

    np.random.seed(7)
    state = rng_state()
    expected = np.random.rand(3)
    np.random.seed(0)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected)


def test_an_older_rng_file_with_numpy_objects_gives_a_clear_error(tmp_path):
    """Checkpoints of an older fewstep hold numpy objects in ``rng/rank_<r>.pt`` and no manifest: they cannot be
    read with ``weights_only=True``; resuming says so, never a traceback from deep inside torch."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    ckpt = checkpoint_dir(run, 2)
    (ckpt / MANIFEST).unlink()
    rng = ckpt / "rng" / "rank_0.pt"
    torch.save({"python": (3, tuple(range(625)), None), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               rng)  # fmt: skip
    with pytest.raises(CheckpointError, match="written by an older fewstep") as err:
        train(make_recipe(tmp_path / "run", max_steps=4))
    assert str(rng) in str(err.value) and "train.resume=never" in str(err.value)


class NumpyStateObjective(OBJECTIVES.get("diffusion")):
    """An objective whose state holds a numpy array: it could only be read back by unpickling."""

    def state_dict(self) -> dict[str, Any]:
        return {"counts": np.arange(3)}


def test_an_objective_state_that_needs_pickle_is_refused_when_saving(tmp_path):
    """A future objective returning numpy objects from ``state_dict()`` would write a checkpoint nobody can load;
    the save refuses it up front, naming the objective, and writes nothing."""
    recipe = make_recipe(tmp_path / "run", max_steps=2)
    components = build_components(recipe)
    objective = NumpyStateObjective(objective_config(recipe), teacher=components.teacher, student=components.student)
    trainer = Trainer(recipe, make_accelerator(recipe), Components(components.teacher, components.student, objective))
    with pytest.raises(TypeError, match=r"objective 'diffusion': its state_dict\(\) holds a numpy.ndarray"):
        trainer.fit()
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


# ---------------------------------------------------------------------------------------------------------------------
# Manifest and fingerprint
# ---------------------------------------------------------------------------------------------------------------------


def test_one_flipped_bit(tmp_path, caplog):
    """One flipped bit in ``trainable/student.safetensors`` used to be resumed, exported and evaluated with exit 0.
    Now export and eval of that checkpoint refuse it with the file named, ``latest`` falls back to the previous
    checkpoint with a warning, an explicit ``train.resume`` path is refused, and ``auto`` resumes from the previous
    checkpoint."""
    run = train(make_recipe(tmp_path / "run"))
    bad_ckpt = checkpoint_dir(run, 4)
    bad = bad_ckpt / "trainable" / "student.safetensors"
    flip_bit(bad)

    with pytest.raises(CheckpointError, match="does not match its sha256") as err:
        export_run(run, tmp_path / "export", checkpoint=bad_ckpt)
    assert str(bad) in str(err.value) and not (tmp_path / "export").exists()
    with pytest.raises(CheckpointError, match="does not match its sha256") as err:
        run_target(run, steps=(1,), teacher_steps=(), checkpoint=bad_ckpt, device="cpu")
    assert str(bad) in str(err.value)

    with caplog.at_level(logging.WARNING, logger="fewstep.train.checkpoint"):
        loaded = load_run(run)
    assert loaded.checkpoint == checkpoint_dir(run, 2)
    assert any(str(bad) in r.getMessage() and "previous checkpoint" in r.getMessage() for r in caplog.records)

    with pytest.raises(CheckpointError, match="does not match its sha256") as err:
        train(make_recipe(tmp_path / "other", max_steps=6, resume=str(bad_ckpt)))
    assert str(bad) in str(err.value)
    assert not (tmp_path / "other" / "checkpoints").exists()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewstep.train.checkpoint"):
        train(make_recipe(tmp_path / "run", max_steps=6))
    assert summary(run)["resumed_from"] == str(checkpoint_dir(run, 2)) and summary(run)["step"] == 6
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    verify_checkpoint(bad_ckpt)  # step 4 was trained again and written whole


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """Resume used to compare only names (and ``copy_`` broadcast shapes): another LoRA rank or another teacher was
    accepted. Now the manifest's fingerprint is compared first and the keys that differ are named."""
    source = train(make_recipe(tmp_path / "a", max_steps=2))
    ckpt = checkpoint_dir(source, 2)

    with pytest.raises(CheckpointError, match="another model") as err:
        train(make_recipe(tmp_path / "b", rank=8, resume=str(ckpt)))
    assert "num_elements" in str(err.value) and "tensors" in str(err.value) and str(ckpt) in str(err.value)

    with pytest.raises(CheckpointError, match="another model") as err:
        train(make_recipe(tmp_path / "c", teacher="fewstep:fashion-vp", resume=str(ckpt)))
    assert "teacher: 'fewstep:digits-vp' in the file, 'fewstep:fashion-vp' expected" in str(err.value)
    for run in ("b", "c"):
        assert not (tmp_path / run / "checkpoints").exists()

    # export/eval rebuild the model from resolved_config.yaml: an edited rank is refused the same way
    config = source / "resolved_config.yaml"
    config.write_text(dump_recipe(make_recipe(source, rank=8, max_steps=2)))
    with pytest.raises(CheckpointError, match="another model .*num_elements"):
        load_run(source)


def test_a_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
    """A checkpoint written before manifests existed still resumes, exports and evaluates, with one warning line."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    (checkpoint_dir(run, 2) / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="fewstep.train.checkpoint"):
        assert load_run(run).checkpoint == checkpoint_dir(run, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no manifest.json" in warnings[0] and "\n" not in warnings[0]


# ---------------------------------------------------------------------------------------------------------------------
# Exact shapes
# ---------------------------------------------------------------------------------------------------------------------


def _cut_lora_b(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.default.weight"))
    return {**tensors, key: tensors[key][:1].clone()}, key  # [1, r]: a copy_ into [out, r] would broadcast


@pytest.mark.parametrize("file", ["trainable/student.safetensors", "ema.safetensors"])
def test_a_tensor_of_another_shape_is_refused_on_resume(file, tmp_path):
    """A tensor of shape [1, r] in place of [out, r] used to be broadcast over the whole matrix by ``copy_`` (in the
    trainer and in the EMA); even with a manifest that agrees, resume refuses it and names the file and the key."""
    run = train(make_recipe(tmp_path / "run", max_steps=2, ema_decay=0.9))
    path = checkpoint_dir(run, 2) / file
    tensors, key = _cut_lora_b(load_file(path))
    save_file(tensors, path, metadata={"updates": json.dumps({"student": 2})})
    rewrite_manifest(checkpoint_dir(run, 2))
    with pytest.raises(CheckpointError, match="other shapes") as err:
        train(make_recipe(tmp_path / "run", max_steps=4, ema_decay=0.9))
    assert str(path) in str(err.value) and key.split("/")[-1] in str(err.value)


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    """AdamW's moments are keyed by position only: a moment of another shape would be broadcast at the next step."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    path = checkpoint_dir(run, 2) / "optimizers" / "student.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = state["optimizer"]["state"][0]["exp_avg"][:1].clone()
    torch.save(state, path)
    rewrite_manifest(checkpoint_dir(run, 2))
    with pytest.raises(CheckpointError, match="other shapes than its parameters") as err:
        train(make_recipe(tmp_path / "run", max_steps=4))
    assert str(path) in str(err.value)


def test_load_run_refuses_weights_of_another_shape(tmp_path):
    """``load_run`` (export, eval, sample) copies each tensor with exactly its parameter's shape: a reshaped trained
    weight or EMA shadow is refused, never broadcast."""
    run = train(make_recipe(tmp_path / "run", max_steps=2, ema_decay=0.9))
    ckpt = checkpoint_dir(run, 2)
    before = load_trainable_weights(ckpt)["student"]
    for file in ("ema.safetensors", "trainable/student.safetensors"):
        tensors, key = _cut_lora_b(load_file(ckpt / file))
        save_file(tensors, ckpt / file)
        rewrite_manifest(ckpt)
        with pytest.raises(ValueError, match="other shapes") as err:
            load_run(run)
        assert key.split("/")[-1] in str(err.value)
    assert before  # the original weights were real LoRA tensors


def test_ema_apply_refuses_shadows_of_another_shape(tmp_path):
    """``EMA.applied()`` (sample grids, periodic evaluation) used to ``copy_`` shadows into the live weights with
    broadcasting; a shadow read from a file of another shape is now refused and the live weights stay as they are."""
    layer = nn.Linear(3, 4)
    ema = EMA({"student": layer}, decay=0.9)
    save_file({"weight": torch.ones(1, 3)}, tmp_path / "shadow.safetensors")
    ema.shadow["student"]["weight"] = load_file(tmp_path / "shadow.safetensors")["weight"]
    live = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"other shapes \['student/weight: \[1, 3\] for \[4, 3\]'\]"):
        with ema.applied():
            pass
    assert torch.equal(layer.weight, live)
    with pytest.raises(ValueError, match="other shapes"):
        EMA({"student": nn.Linear(3, 4)}, decay=0.9).load_state_dict(load_file(tmp_path / "shadow.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Atomic pruning, unique temp directories
# ---------------------------------------------------------------------------------------------------------------------


def test_a_kill_during_pruning_leaves_no_half_checkpoint(tmp_path, caplog):
    """A kill -9 during keep-last pruning used to leave a half-deleted ``step_*`` directory still marked COMPLETE.
    Pruning now renames a checkpoint aside before deleting it: what a kill leaves (a half-deleted ``.trash_`` and a
    half-written ``.tmp_`` directory) is never listed or resumed, and the next start sweeps it. A half-deleted
    ``step_*`` left by an older fewstep fails its manifest and is passed over."""
    run = train(make_recipe(tmp_path / "run", max_steps=4, checkpoint_every=1, keep_last=2))
    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000004"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]

    dead = 2**22 + 1  # above Linux's largest pid: no live process
    trash = root / f".trash_step_00000002.{dead}-0a1b2c3d"  # killed half-way through deleting step 2
    (trash / "rng").mkdir(parents=True)
    (trash / COMPLETE).write_text("ok\n")
    tmp = root / f".tmp_step_00000005.{dead}-4e5f6a7b"  # killed after COMPLETE, before the rename
    (tmp / "trainable").mkdir(parents=True)
    (tmp / COMPLETE).write_text("ok\n")
    old_tmp = root / ".tmp_step_00000005"  # an older fewstep's fixed temp name
    (old_tmp / "rng").mkdir(parents=True)
    half = root / "step_00000005"  # an older fewstep's rmtree killed half-way: COMPLETE still there
    for rel in ("trainable/student.safetensors", "objective.pt", "state.json", MANIFEST, COMPLETE):
        (half / rel).parent.mkdir(parents=True, exist_ok=True)
        (half / rel).write_bytes((checkpoint_dir(run, 4) / rel).read_bytes())

    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000004", "step_00000005"]
    with caplog.at_level(logging.WARNING, logger="fewstep.train.checkpoint"):
        train(make_recipe(tmp_path / "run", max_steps=6, checkpoint_every=1, keep_last=2))
    assert summary(run)["resumed_from"] == str(checkpoint_dir(run, 4)) and summary(run)["step"] == 6
    assert any(str(half / "optimizers" / "student.pt") in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000006"]
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)


def test_temp_directories_are_unique_to_one_save(tmp_path):
    """Two trainers on one output_dir used to share the fixed temp name ``.tmp_step_XXXXXXXX`` (one deleted or
    published the other's half-written checkpoint). The temp name now carries the saving process's id and a random
    token; a temp directory of another live process is left alone by the sweep."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = tmp_path / "run" / "checkpoints"
        busy = root / f".tmp_step_00000002.{other.pid}-0a1b2c3d"
        (busy / "trainable").mkdir(parents=True)
        (busy / "trainable" / "student.safetensors").write_bytes(b"another trainer's half-written file")
        run = train(make_recipe(tmp_path / "run", max_steps=2))
        assert (busy / "trainable" / "student.safetensors").read_bytes() == b"another trainer's half-written file"
        verify_checkpoint(checkpoint_dir(run, 2))  # ours, whole
        assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    finally:
        other.kill()
        other.wait()
    train(make_recipe(tmp_path / "run", max_steps=3))
    assert not busy.exists()  # its owner is gone: swept at the next start
