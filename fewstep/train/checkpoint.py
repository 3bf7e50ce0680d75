"""Checkpoints: everything an exact resume needs, written atomically, verified before use, keep-last-K.

Layout of ``<run_dir>/checkpoints/step_XXXXXXXX/``::

    trainable/<group>.safetensors   weights that train: params with requires_grad (+ buffers of a full model)
    optimizers/<group>.pt           {"optimizer": AdamW state, "scheduler": LR-schedule state}
    ema.safetensors                 {"<group>/<param>": EMA shadow} (only with train.ema_decay)
    auxiliary/<group>.safetensors   the group's auxiliary module (objective.auxiliary(); only if it has one)
    auxiliary/ema.safetensors       their EMA shadows, as ema.safetensors (only with both)
    objective.pt                    objective.state_dict() (target nets, counters)
    rng/rank_<r>.pt                 python / numpy / torch (/ cuda) RNG states of every rank, as tensors and numbers
    state.json                      step, data position, non-finite count, world size
    sharded/                        FSDP runs: the weights, optimizer moments and EMA shadows, one safetensors shard
                                    per rank (``fewstep.train.sharded_checkpoint``) instead of ``trainable/``,
                                    ``ema.safetensors`` and the tensors of ``optimizers/``
    manifest.json                   sha256 of every file above, and the fingerprint of the model they belong to
    COMPLETE                        written last; a directory without it is never resumed from

Safety rules:

* Nothing in a checkpoint can run code. The ``.pt`` files hold only tensors, numbers, strings, bools, ``None`` and
  lists, tuples and dicts of those, and are read with ``torch.load(weights_only=True)``; a file holding anything else
  (a pickled object: the file was changed, or written by other software) is refused unread. An objective whose
  ``state_dict()`` holds something else is refused when the checkpoint is written.
* Every file is checked before anything is loaded: its sha256 against ``manifest.json`` (``fewstep.train.manifest``),
  and the manifest's fingerprint (trainable tensor names and shapes, backbone family, objective, teacher) against the
  model about to receive the weights. A changed, truncated, added or missing file, or another model's checkpoint, is
  refused with the file named. ``train.resume=auto`` (and ``load_run``'s ``latest``) then falls back to the newest
  earlier checkpoint that verifies, with a warning; a checkpoint named explicitly is refused, never replaced. A
  checkpoint without ``manifest.json`` (written by an older fewstep) loads with a warning.
* Every tensor is copied with exactly the shape of its destination (no broadcasting).

Writes go to ``checkpoints/.tmp_step_XXXXXXXX.<pid>-<random>`` (a name unique to this save, chosen by the main process
and shared with every rank, which adds its RNG file), are fsynced, and the directory is renamed into place with
``os.replace``: a crash leaves either the old set of checkpoints or the new one. Pruning (``train.keep_last``) first
renames a checkpoint aside to ``checkpoints/.trash_step_XXXXXXXX.<pid>-<random>``, then deletes it: a kill mid-way
never leaves a half-deleted ``step_*`` directory. Hidden ``.tmp_*`` and ``.trash_*`` leftovers are never listed as
checkpoints, and are swept when a trainer starts and after every save.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.train.ema import EMA, shape_mismatches, trainable_state
from fewstep.train.manifest import (
    MANIFEST,
    IntegrityError,
    fingerprint_differences,
    read_manifest,
    verify_manifest,
    weights_fingerprint,
    write_manifest,
)
from fewstep.train.sharded_checkpoint import (
    SHARDED_DIR,
    has_sharded,
    load_sharded,
    read_sharded,
    save_sharded,
    saved_keys,
    sharded_state,
)

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe
    from fewstep.models.teacher import Teacher

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
PREFIX = "step_"
BEST = "best"  # checkpoints/best: the best checkpoint kept by periodic evaluation (never pruned)
BEST_RECORD = "best.json"  # added to checkpoints/best by periodic evaluation, after the manifest was written
EMA_FILE = "ema.safetensors"
TMP, TRASH = ".tmp_", ".trash_"  # a checkpoint being written / being deleted (never listed)
_STEP_NAME = re.compile(rf"{PREFIX}\d+")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match its manifest (changed, truncated, added or missing after it was written)."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (``step_<digits>`` with ``COMPLETE``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``train.resume`` → the checkpoint to load: ``never`` → None, ``auto`` → the newest in ``run_dir`` (or None),
    a path → that checkpoint (a run directory resolves to its newest one).

    The main process first sweeps the leftovers of interrupted saves and prunes (``sweep_leftovers``)."""
    if _is_main_process():
        sweep_leftovers(run_dir)
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
            "Point it to a `<run>/checkpoints/step_XXXXXXXX` directory, or start over with "
            "train.resume=never --overwrite."
        )
    return newest


def sweep_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete ``checkpoints/.tmp_*`` and ``checkpoints/.trash_*`` left by an interrupted save or prune; a directory
    whose name carries the id of another live process on this machine (a save in progress) is kept. Returns what
    was deleted."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    swept = []
    for path in sorted(root.iterdir()):
        if path.name.startswith((TMP, TRASH)) and not _owner_alive(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            swept.append(path)
    return swept


def checkpoint_fingerprint(groups: dict[str, nn.Module], recipe: Recipe, teacher: Teacher) -> dict[str, Any]:
    """The fingerprint a run's checkpoints carry (``fewstep.train.manifest.weights_fingerprint``): every trainable
    tensor's name and shape per group (``objective.trainable()``, unwrapped), the backbone family, the objective's
    name and the teacher (``teacher.pretrained``)."""
    return weights_fingerprint(
        {name: trainable_state(module) for name, module in groups.items()},
        family=teacher.family,
        objective=recipe.objective.name,
        teacher=recipe.teacher.pretrained,
    )


def load_trainable_weights(ckpt_dir: str | Path) -> dict[str, dict[str, Tensor]]:
    """``{group: {name: tensor}}`` from ``trainable/*.safetensors`` of a checkpoint, or consolidated from the shards of
    a sharded one (CPU tensors)."""
    ckpt_dir = Path(ckpt_dir)
    if has_sharded(ckpt_dir):
        return _read(ckpt_dir, ckpt_dir / SHARDED_DIR, lambda p: read_sharded(ckpt_dir, "trainable"))
    files = sorted((ckpt_dir / "trainable").glob("*.safetensors"))
    if not files:
        raise CheckpointError(_broken(ckpt_dir, ckpt_dir / "trainable", "holds no *.safetensors file"))
    return {f.stem: _read(ckpt_dir, f, load_file) for f in files}


def has_ema(ckpt_dir: str | Path) -> bool:
    """Whether the checkpoint holds EMA shadows (``ema.safetensors``, or the EMA record of a sharded one)."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / EMA_FILE).is_file() or (has_sharded(ckpt_dir) and (ckpt_dir / "ema_updates.json").is_file())


def load_ema_weights(ckpt_dir: str | Path) -> dict[str, Tensor]:
    """The EMA shadows ``{"<group>/<param>": tensor}`` of a checkpoint (``ema.safetensors``, or consolidated from the
    shards of a sharded one; CPU tensors)."""
    ckpt_dir = Path(ckpt_dir)
    if has_sharded(ckpt_dir):
        shadows = _read(ckpt_dir, ckpt_dir / SHARDED_DIR, lambda p: read_sharded(ckpt_dir, "ema"))
        return {f"{group}/{name}": t for group, named in shadows.items() for name, t in named.items()}
    return _read(ckpt_dir, ckpt_dir / EMA_FILE, load_file)


# ---------------------------------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------------------------------


def check_fingerprint(ckpt_dir: str | Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose manifest holds another model's fingerprint (a no-op without a manifest).

    Raises:
        CheckpointError: naming the checkpoint and every fingerprint key that differs.
        CorruptCheckpointError: the manifest cannot be read.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except IntegrityError as err:
        raise CorruptCheckpointError(f"{err} {_FIX}") from err
    if manifest is None:
        return
    found = {key: manifest["fingerprint"].get(key) for key in fingerprint}
    differences = fingerprint_differences(fingerprint, found)
    if differences:
        raise CheckpointError(
            f"Checkpoint {ckpt_dir} does not match the model being loaded: it holds weights of another model "
            f"({'; '.join(differences)}; from {ckpt_dir / MANIFEST}). Load it with the recipe it was written with "
            "(its run's resolved_config.yaml); to train this model instead, start over with "
            "train.resume=never --overwrite (the old run is moved aside)."
        )


def verify_checkpoint(ckpt_dir: str | Path, fingerprint: dict[str, Any] | None = None) -> None:
    """Check a checkpoint before anything in it is read: the manifest's fingerprint against ``fingerprint`` (when
    given), then every file's sha256. A checkpoint without ``manifest.json`` (an older fewstep) passes with a
    warning.

    Raises:
        CheckpointError: another model's checkpoint (the fingerprint keys that differ are named).
        CorruptCheckpointError: a file changed, truncated, added or missing (the file is named).
    """
    ckpt_dir = Path(ckpt_dir)
    if fingerprint is not None:
        check_fingerprint(ckpt_dir, fingerprint)
    try:
        manifest = verify_manifest(ckpt_dir, ignore=(COMPLETE, BEST_RECORD))
    except IntegrityError as err:
        raise CorruptCheckpointError(str(err)) from err
    if manifest is None:
        logger.warning(
            "Checkpoint %s has no %s (written by an older fewstep): its files cannot be verified.", ckpt_dir, MANIFEST
        )


def intact_checkpoint(
    ckpt_dir: str | Path,
    fingerprint: dict[str, Any] | None = None,
    *,
    fallback: bool = False,
    accelerator: Any = None,
) -> Path:
    """``ckpt_dir`` once ``verify_checkpoint`` passes; with ``fallback`` a corrupt one is skipped for the newest
    earlier checkpoint of its run that verifies, with a warning naming the bad file.

    Only the main process reads the files (``accelerator``: every process gets its answer).

    Raises:
        CheckpointError: another model's checkpoint; or a corrupt one (``CorruptCheckpointError``) without
            ``fallback`` or without an intact earlier checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)

    def choose() -> Path:
        try:
            verify_checkpoint(ckpt_dir, fingerprint)
            return ckpt_dir
        except CorruptCheckpointError as err:
            if not fallback or not _STEP_NAME.fullmatch(ckpt_dir.name):
                raise
            problem = err
        earlier = [p for p in list_checkpoints(ckpt_dir.parent.parent) if _step_of(p) < _step_of(ckpt_dir)]
        for candidate in reversed(earlier):
            logger.warning("%s Using the previous checkpoint %s instead.", problem, candidate)
            try:
                verify_checkpoint(candidate, fingerprint)
                return candidate
            except CorruptCheckpointError as err:
                problem = err
        raise CorruptCheckpointError(f"{problem} No earlier checkpoint of this run is intact.")

    return _from_main(accelerator, choose)


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
    fingerprint: dict[str, Any] | None = None,
    sharded: bool = False,
) -> None:
    """Write one checkpoint atomically from every rank (collective: all ranks must call it). ``sharded`` (FSDP runs):
    weights, optimizer moments and EMA shadows go to ``sharded/``, each rank writing its shard.

    ``auxiliary`` (``objective.auxiliary()``) and ``auxiliary_ema`` (their EMA shadows) go to ``auxiliary/``.
    ``fingerprint`` (``checkpoint_fingerprint``) goes to ``manifest.json``; without it, one of the trainable shapes
    alone.

    Raises:
        TypeError: before anything is written, when ``objective_state`` (or an optimizer or LR-schedule state) holds
            something ``torch.load(weights_only=True)`` could not read back.
    """
    objective = (fingerprint or {}).get("objective")
    _check_plain(
        objective_state, f"objective {objective!r}: its state_dict()" if objective else "objective.state_dict()"
    )
    states = {name: {"optimizer": _optimizer_record(optimizers[name], sharded),
                     "scheduler": schedulers[name].state_dict()} for name in trainable}  # fmt: skip
    for name, state in states.items():
        _check_plain(state, f"trainable group {name!r}: its optimizer or LR-schedule state")
    main = accelerator.is_main_process
    token = _from_main(accelerator, _unique_token)  # one temp name per save, the same on every rank
    tmp = ckpt_dir.parent / f"{TMP}{ckpt_dir.name}.{token}"
    if main:
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded:  # every rank its shard; the main process the rest
        save_sharded(sharded_state(trainable, optimizers, ema, auxiliary), tmp)
    if main:
        (tmp / "optimizers").mkdir()
        for name, module in trainable.items():
            if not sharded:
                (tmp / "trainable").mkdir(exist_ok=True)
                path = tmp / "trainable" / f"{name}.safetensors"
                save_file(_cpu(trainable_state(accelerator.unwrap_model(module))), path)
            torch.save(states[name], tmp / "optimizers" / f"{name}.pt")
        if ema is not None and sharded:
            (tmp / "ema_updates.json").write_text(json.dumps(ema.updates))
        elif ema is not None:
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
        if fingerprint is None:
            groups = {name: trainable_state(accelerator.unwrap_model(m)) for name, m in trainable.items()}
            fingerprint = weights_fingerprint(groups)
        write_manifest(tmp, fingerprint, "checkpoint", exclude=(COMPLETE,))
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        aside = None
        if ckpt_dir.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            aside = _rename_aside(ckpt_dir)
        os.replace(tmp, ckpt_dir)
        _fsync_dir(ckpt_dir.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        prune_checkpoints(ckpt_dir.parent.parent, keep_last)
    accelerator.wait_for_everyone()


def _optimizer_record(optimizer: Any, sharded: bool) -> dict[str, Any]:
    """What ``optimizers/<group>.pt`` holds: the optimizer's state dict, or for a sharded run its hyperparameters
    alone (the per-parameter state is in ``sharded/``)."""
    if not sharded:
        return optimizer.state_dict()
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


def _save_ema(ema: EMA, path: Path) -> None:
    save_file(_cpu(ema.state_dict()), path, metadata={"updates": json.dumps(ema.updates)})


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (``keep_last <= 0`` keeps all), each renamed
    aside first, and sweep the leftovers of interrupted saves (``sweep_leftovers``)."""
    sweep_leftovers(run_dir)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(_rename_aside(old), ignore_errors=True)


def _rename_aside(ckpt_dir: Path) -> Path:
    """Rename a checkpoint to a hidden ``.trash_`` name (atomic: it stops being a checkpoint at once)."""
    aside = ckpt_dir.parent / f"{TRASH}{ckpt_dir.name}.{_unique_token()}"
    os.replace(ckpt_dir, aside)
    _fsync_dir(ckpt_dir.parent)
    return aside


def _unique_token() -> str:
    """``<pid>-<random>``: unique to one save or prune (``sweep_leftovers`` keeps a live process's directories)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(name: str) -> bool:
    """Whether ``<name>.<pid>-<random>`` names a live process on this machine other than this one."""
    pid = name.rpartition(".")[2].partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # it exists, under another user
        return True
    except (OSError, OverflowError):
        return False
    return True


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors, numbers and tuples (loadable with
    ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, 625 ints, gauss_next)
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # MT19937's 624 uint32 words
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
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
    *,
    fingerprint: dict[str, Any] | None = None,
    verified: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights, optimizers, schedules, EMA, auxiliary modules (and their EMA) and this rank's RNG in place.
    Returns ``(objective_state, meta)``.

    The checkpoint is verified first (``verify_checkpoint`` against ``fingerprint``) unless ``verified`` says
    ``intact_checkpoint`` just did.

    Raises:
        CheckpointError: naming the file that is corrupt, missing, of another model, or refused unread.
    """
    if not verified:
        intact_checkpoint(ckpt_dir, fingerprint, accelerator=accelerator)
    meta = _read(ckpt_dir, ckpt_dir / "state.json", lambda p: json.loads(p.read_text()))
    if has_sharded(ckpt_dir):
        _load_sharded_checkpoint(ckpt_dir, trainable, optimizers, schedulers, ema, auxiliary)
        trainable, ema = {}, None  # loaded
    elif _is_sharded_run(trainable):
        raise CheckpointError(
            f"{ckpt_dir} is an unsharded checkpoint, and this run shards its weights (train.fsdp or an FSDP launch). "
            "Resume it the way it was written (without FSDP), or start the sharded run over with "
            "train.resume=never --overwrite."
        )
    for name, module in trainable.items():
        weights = _read(ckpt_dir, ckpt_dir / "trainable" / f"{name}.safetensors", load_file)
        _load_weights(accelerator.unwrap_model(module), weights, ckpt_dir, Path("trainable") / f"{name}.safetensors")
        path = ckpt_dir / "optimizers" / f"{name}.pt"
        _read(ckpt_dir, path, lambda p, n=name: _load_optimizer(_torch_load(ckpt_dir, p), optimizers[n], schedulers[n]))
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
    _read(ckpt_dir, rank_file, lambda p: set_rng_state(_torch_load(ckpt_dir, p)))
    objective_state = _read(ckpt_dir, ckpt_dir / "objective.pt", lambda p: _torch_load(ckpt_dir, p))
    return objective_state, meta


def _load_sharded_checkpoint(
    ckpt_dir: Path,
    trainable: dict[str, nn.Module],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    ema: EMA | None,
    auxiliary: dict[str, nn.Module] | None,
) -> None:
    """Weights, optimizer moments and EMA from ``sharded/`` (any world size), hyperparameters and schedules from
    ``optimizers/``, EMA update counts from ``ema_updates.json``."""
    keys = _read(ckpt_dir, ckpt_dir / SHARDED_DIR, lambda p: saved_keys(ckpt_dir))
    state = sharded_state(trainable, optimizers, ema, auxiliary, saved=keys)
    with torch.no_grad():
        _read(ckpt_dir, ckpt_dir / SHARDED_DIR, lambda p: load_sharded(state, ckpt_dir))
    for name in trainable:
        record = _read(ckpt_dir, ckpt_dir / "optimizers" / f"{name}.pt", lambda p: _torch_load(ckpt_dir, p))
        for group, saved in zip(optimizers[name].param_groups, record["optimizer"]["param_groups"]):
            group.update(saved)
        schedulers[name].load_state_dict(record["scheduler"])
    if ema is not None:
        updates = ckpt_dir / "ema_updates.json"
        if not updates.is_file():
            raise CheckpointError(
                f"{updates} does not exist: the checkpoint was written without EMA but train.ema_decay is set. "
                "Resume with train.ema_decay=null, or start over with train.resume=never --overwrite."
            )
        ema.updates = _read(ckpt_dir, updates, lambda p: json.loads(p.read_text()))


def _is_sharded_run(trainable: dict[str, nn.Module]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for m in trainable.values() for p in m.parameters())


def _load_optimizer(state: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
    """Load an optimizer and its LR schedule; every per-parameter state tensor must have its parameter's shape."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    reshaped = [
        f"param {i} {key}: {list(value.shape)} for {list(p.shape)}"
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape)
    ]
    if reshaped:
        raise ValueError(f"optimizer state of other shapes than its parameters ({reshaped[:3]})")


def _load_ema(ckpt_dir: Path, path: Path, ema: EMA) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: the checkpoint was written without EMA but train.ema_decay is set. "
            "Resume with train.ema_decay=null, or start over with "
            "train.resume=never --overwrite (the old run is moved aside)."
        )
    shadows, metadata = _read(ckpt_dir, path, _load_with_metadata)
    try:
        ema.load_state_dict(shadows, json.loads(metadata["updates"]) if "updates" in metadata else None)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} does not match the EMA of the weights being trained: {err}") from err


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
            "train.resume=never --overwrite."
        )
    with torch.no_grad():
        for key, t in expected.items():
            t.copy_(weights[key])


def _torch_load(ckpt_dir: Path, path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only; anything else is refused unread."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not (ckpt_dir / MANIFEST).is_file() and "numpy" in str(err):
            raise CheckpointError(
                f"Checkpoint file {path} holds numpy objects: the checkpoint {ckpt_dir} was written by an older "
                "fewstep, whose RNG files fewstep no longer loads (unpickling them could run code). Start over with "
                "train.resume=never --overwrite, or resume with the fewstep version that wrote it. It was not loaded."
            ) from err
        raise CheckpointError(
            f"Checkpoint file {path} holds pickled objects other than tensors and plain values. fewstep never writes "
            "such content: the file was changed or written by other software. It was not loaded, because loading it "
            f"could run code. Delete the checkpoint {ckpt_dir} (train.resume=auto then continues from the previous "
            "one) or start over with train.resume=never --overwrite."
        ) from err


def _load_with_metadata(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _read(ckpt_dir: Path, path: Path, reader: Callable[[Path], Any]) -> Any:
    if not (path.is_file() or (path.name == SHARDED_DIR and path.is_dir())):
        raise CheckpointError(_broken(ckpt_dir, path, "is missing"))
    try:
        return reader(path)
    except CheckpointError:
        raise
    except Exception as err:  # any decoding failure means a corrupt file
        raise CheckpointError(_broken(ckpt_dir, path, f"cannot be read ({type(err).__name__}: {err})")) from err


_FIX = "Delete this checkpoint (train.resume=auto then continues from the previous one) or start over."


def _broken(ckpt_dir: Path, path: Path, what: str) -> str:
    return (
        f"Checkpoint file {path} {what}: the checkpoint {ckpt_dir} is corrupt. Delete it (train.resume=auto then "
        "continues from the previous checkpoint) or start over with train.resume=never --overwrite."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------

_PLAIN = (bool, int, float, str, type(None), torch.Size, torch.dtype, Tensor, nn.Parameter)


def _check_plain(value: Any, owner: str) -> None:
    """Raise ``TypeError`` naming ``owner`` when ``value`` holds anything but tensors, numbers, strings, bools,
    ``None`` and lists, tuples and dicts of those (what ``torch.load(weights_only=True)`` reads back)."""
    found = _first_unplain(value, "")
    if found is not None:
        raise TypeError(
            f"{owner} holds {found}, which a checkpoint cannot store: checkpoints are read with "
            "torch.load(weights_only=True), which accepts only tensors, numbers, strings, bools, None and lists, "
            "tuples and dicts of those (nothing that could run code when loaded). Store it as one of those (a numpy "
            "array as torch.from_numpy(...), a torch.Generator as generator.get_state())."
        )


def _first_unplain(value: Any, where: str) -> str | None:
    kind = type(value)
    if kind in _PLAIN:
        return None
    if kind in (list, tuple):
        items: Any = enumerate(value)
    elif kind in (dict, OrderedDict):
        bad_key = next((k for k in value if type(k) not in (str, int)), None)
        if bad_key is not None:
            return f"the key {bad_key!r} ({type(bad_key).__qualname__}) at {where or 'the top'}"
        items = value.items()
    else:
        return f"a {kind.__module__}.{kind.__qualname__} at {where or 'the top'}"
    for key, item in items:
        found = _first_unplain(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def _from_main(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on the main process only; every process gets its result, or raises its error."""
    result, error = None, None
    if accelerator is None or accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:
            error = err
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = None if error is None else f"{error}"
        result, message = broadcast_object_list([(result, message)], from_process=0)[0]
        if error is None and message is not None:
            raise CheckpointError(message)
    if error is not None:
        raise error
    return result


def _is_main_process() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


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
