"""Checkpoints: everything an exact resume needs, written atomically, keep-last-K.

Layout of ``<run_dir>/checkpoints/step_XXXXXXXX/``::

    trainable/<group>.safetensors   weights that train: params with requires_grad (+ buffers of a full model)
    optimizers/<group>.pt           {"optimizer": AdamW state, "scheduler": LR-schedule state}
    ema.safetensors                 {"<group>/<param>": EMA shadow} (only with train.ema_decay)
    auxiliary/<group>.safetensors   the group's auxiliary module (objective.auxiliary(); only if it has one)
    auxiliary/ema.safetensors       their EMA shadows, as ema.safetensors (only with both)
    objective.pt                    objective.state_dict() (target nets, counters)
    rng/rank_<r>.pt                 python / numpy / torch (/ cuda) RNG states of every rank
    state.json                      step, data position, non-finite count, world size
    COMPLETE                        written last; a directory without it is never resumed from

Writes go to ``checkpoints/.tmp_step_XXXXXXXX`` (every rank adds its RNG file), are fsynced, and the directory is
renamed into place with ``os.replace``: a crash leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.train.ema import EMA

COMPLETE = "COMPLETE"
PREFIX = "step_"
BEST = "best"  # checkpoints/best: the best checkpoint kept by periodic evaluation (never pruned)
EMA_FILE = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``train.resume`` → the checkpoint to load: ``never`` → None, ``auto`` → the newest in ``run_dir`` (or None),
    a path → that checkpoint (a run directory resolves to its newest one)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"train.resume={resume!r}: no such checkpoint. Point it to a `<run>/checkpoints/step_XXXXXXXX` "
            "directory, or use `auto` (the newest checkpoint in output_dir) or `never` (start over)."
        )
    if (path / COMPLETE).is_file():
        return path
    run = path.parent if path.name == "checkpoints" else path
    newest = latest_checkpoint(run)
    if newest is None:
        raise CheckpointError(
            f"train.resume={resume!r} is not a complete checkpoint (no {COMPLETE} marker) and holds none. "
            "Point it to a `<run>/checkpoints/step_XXXXXXXX` directory, or set train.resume=never."
        )
    return newest


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The weights that train: parameters with ``requires_grad``; for a full model (nothing frozen) also buffers.
    A LoRA student therefore saves only its adapters."""
    state = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    if all(p.requires_grad for p in module.parameters()):
        state.update({n: b.detach() for n, b in module.named_buffers() if b is not None})
    return state


def load_trainable_weights(ckpt_dir: str | Path) -> dict[str, dict[str, Tensor]]:
    """``{group: {name: tensor}}`` from ``trainable/*.safetensors`` of a checkpoint (CPU tensors)."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted((ckpt_dir / "trainable").glob("*.safetensors"))
    if not files:
        raise CheckpointError(_broken(ckpt_dir, ckpt_dir / "trainable", "holds no *.safetensors file"))
    return {f.stem: _read(ckpt_dir, f, load_file) for f in files}


# ---------------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_dir: Path,
    accelerator: Any,
    trainable: dict[str, nn.Module],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    ema: EMA | None,
    objective_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
    auxiliary: dict[str, nn.Module] | None = None,
    auxiliary_ema: EMA | None = None,
) -> None:
    """Write one checkpoint atomically from every rank (collective: all ranks must call it).

    ``auxiliary`` (``objective.auxiliary()``) and ``auxiliary_ema`` (their EMA shadows) go to ``auxiliary/``."""
    tmp = ckpt_dir.parent / f".tmp_{ckpt_dir.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    if main:
        (tmp / "trainable").mkdir()
        (tmp / "optimizers").mkdir()
        for name, module in trainable.items():
            save_file(
                _cpu(trainable_state(accelerator.unwrap_model(module))), tmp / "trainable" / f"{name}.safetensors"
            )
            state = {"optimizer": optimizers[name].state_dict(), "scheduler": schedulers[name].state_dict()}
            torch.save(state, tmp / "optimizers" / f"{name}.pt")
        if ema is not None:
            _save_ema(ema, tmp / EMA_FILE)
        if auxiliary:
            (tmp / "auxiliary").mkdir()
            for name, module in auxiliary.items():
                save_file(_cpu(trainable_state(module)), tmp / "auxiliary" / f"{name}.safetensors")
            if auxiliary_ema is not None:
                _save_ema(auxiliary_ema, tmp / "auxiliary" / "ema.safetensors")
        torch.save(objective_state, tmp / "objective.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    torch.save(rng_state(), tmp / "rng" / f"rank_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if ckpt_dir.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(ckpt_dir)
        os.replace(tmp, ckpt_dir)
        _fsync_dir(ckpt_dir.parent)
        prune_checkpoints(ckpt_dir.parent.parent, keep_last)
    accelerator.wait_for_everyone()


def _save_ema(ema: EMA, path: Path) -> None:
    save_file(_cpu(ema.state_dict()), path, metadata={"updates": json.dumps(ema.updates)})


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (``keep_last <= 0`` keeps all) and stale temps."""
    root = run_dir / "checkpoints"
    for stale in root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------------


def load_checkpoint(
    ckpt_dir: Path,
    accelerator: Any,
    trainable: dict[str, nn.Module],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    ema: EMA | None,
    auxiliary: dict[str, nn.Module] | None = None,
    auxiliary_ema: EMA | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights, optimizers, schedules, EMA, auxiliary modules (and their EMA) and this rank's RNG in place.
    Returns ``(objective_state, meta)``."""
    meta = _read(ckpt_dir, ckpt_dir / "state.json", lambda p: json.loads(p.read_text()))
    for name, module in trainable.items():
        weights = _read(ckpt_dir, ckpt_dir / "trainable" / f"{name}.safetensors", load_file)
        _load_weights(accelerator.unwrap_model(module), weights, ckpt_dir, Path("trainable") / f"{name}.safetensors")
        state = _read(ckpt_dir, ckpt_dir / "optimizers" / f"{name}.pt", _torch_load)
        optimizers[name].load_state_dict(state["optimizer"])
        schedulers[name].load_state_dict(state["scheduler"])
    for name, module in (auxiliary or {}).items():
        weights = _read(ckpt_dir, ckpt_dir / "auxiliary" / f"{name}.safetensors", load_file)
        _load_weights(module, weights, ckpt_dir, Path("auxiliary") / f"{name}.safetensors")
    if ema is not None:
        _load_ema(ckpt_dir, ckpt_dir / EMA_FILE, ema)
    if auxiliary_ema is not None:
        _load_ema(ckpt_dir, ckpt_dir / "auxiliary" / "ema.safetensors", auxiliary_ema)
    rank_file = ckpt_dir / "rng" / f"rank_{accelerator.process_index}.pt"
    if not rank_file.is_file():  # resumed on more processes than saved: this rank continues rank 0's stream
        rank_file = ckpt_dir / "rng" / "rank_0.pt"
    set_rng_state(_read(ckpt_dir, rank_file, _torch_load))
    objective_state = _read(ckpt_dir, ckpt_dir / "objective.pt", _torch_load)
    return objective_state, meta


def _load_ema(ckpt_dir: Path, path: Path, ema: EMA) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: the checkpoint was written without EMA but train.ema_decay is set. "
            "Resume with train.ema_decay=null, or start over with train.resume=never."
        )
    shadows, metadata = _read(ckpt_dir, path, _load_with_metadata)
    ema.load_state_dict(shadows, json.loads(metadata["updates"]) if "updates" in metadata else None)


def _load_weights(module: nn.Module, weights: dict[str, Tensor], ckpt_dir: Path, file: Path) -> None:
    """Copy ``weights`` (from ``ckpt_dir / file``) into ``module``'s trainable state; keys must match exactly."""
    expected = trainable_state(module)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = shape_mismatches(expected, weights)
    if missing or unexpected or reshaped:
        name = file.stem
        raise CheckpointError(
            f"{ckpt_dir / file} does not match the {name!r} weights being trained "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {reshaped[:3]}): it was written "
            "with another student or objective. Resume with the recipe it was trained with, or set "
            "train.resume=never."
        )
    with torch.no_grad():
        for key, t in expected.items():
            t.copy_(weights[key])


def shape_mismatches(expected: dict[str, Tensor], given: dict[str, Tensor]) -> list[str]:
    """``"<key>: <given shape> for <expected shape>"`` for every shared key whose shapes differ (copying such a
    tensor would broadcast it silently, or fail deep inside torch)."""
    return [
        f"{key}: {list(given[key].shape)} for {list(t.shape)}"
        for key, t in expected.items()
        if key in given and tuple(given[key].shape) != tuple(t.shape)
    ]


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG states hold numpy arrays


def _load_with_metadata(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _read(ckpt_dir: Path, path: Path, reader: Callable[[Path], Any]) -> Any:
    if not path.is_file():
        raise CheckpointError(_broken(ckpt_dir, path, "is missing"))
    try:
        return reader(path)
    except Exception as err:  # any decoding failure means a corrupt file
        raise CheckpointError(_broken(ckpt_dir, path, f"cannot be read ({type(err).__name__}: {err})")) from err


def _broken(ckpt_dir: Path, path: Path, what: str) -> str:
    return (
        f"Checkpoint file {path} {what}: the checkpoint {ckpt_dir} is corrupt. Delete it (train.resume=auto then "
        "continues from the previous checkpoint) or set train.resume=never to start over."
    )


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
