"""Sharded checkpoints of FSDP runs: every rank writes its own shard of the weights, optimizer moments and EMA
shadows with ``torch.distributed.checkpoint`` (DCP), and any number of processes reads them back.

Files go to ``<checkpoint>/sharded/`` in DCP's Hugging Face safetensors format: one ``shard-<rank>…safetensors``
per rank, whose header records each tensor's offset in the whole tensor, plus a JSON index. Nothing is pickled, so a
sharded checkpoint keeps the rule that no checkpoint file can run code (DCP's default format pickles its metadata).
DCP reads the pieces each destination tensor needs by offset, which is what makes a resume on another world size
(2 → 1, 1 → 2 processes, another hybrid degree) exact. The rest of the checkpoint (schedules, objective state, RNG,
``state.json``, manifest, ``COMPLETE``) is written as for unsharded runs, and the checkpoint is complete only when
every rank's shard and the main process's files are written (``fewstep.train.checkpoint.save_checkpoint``).

Keys: ``trainable/<group>/<name>``, ``ema/<group>/<name>``, ``optimizer/<group>/<name>/<state>`` where ``<name>``
is the parameter's name in its group (``auxiliary/<name>`` for the group's auxiliary module) and ``<state>`` the
optimizer's per-parameter state (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fewstep.train.ema import trainable_parameters, trainable_state

if TYPE_CHECKING:
    from fewstep.train.ema import EMA

SHARDED_DIR = "sharded"


def named_optimizer_params(module: nn.Module, auxiliary: nn.Module | None) -> dict[str, Tensor]:
    """The parameters one group's optimizer steps, by name, in ``build_optimizers``' order."""
    named = dict(trainable_parameters(module))
    if auxiliary is not None:
        named.update({f"auxiliary/{k}": p for k, p in trainable_parameters(auxiliary).items()})
    return named


def sharded_state(
    trainable: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA | None,
    auxiliary: dict[str, nn.Module] | None = None,
    *,
    saved: set[str] | None = None,
) -> dict[str, Tensor]:
    """The flat DCP state of a run: its tensors themselves (sharded ones as DTensors), so that ``dcp.load`` fills
    them in place. ``saved`` (loading): the checkpoint's keys; optimizer state the checkpoint holds but a fresh
    optimizer has not created yet is created first, zeros of the parameter's layout, for the values to land in (a
    group whose optimizer had not stepped when the checkpoint was written, such as DMD2's generator before its first
    turn, has none and stays fresh)."""
    state: dict[str, Tensor] = {}
    for group, module in trainable.items():
        state.update({f"trainable/{group}/{k}": t for k, t in trainable_state(module).items()})
        optimizer = optimizers[group]
        for name, param in named_optimizer_params(module, (auxiliary or {}).get(group)).items():
            slots = optimizer.state.get(param)
            if not slots and saved is not None and f"optimizer/{group}/{name}/exp_avg" in saved:
                slots = optimizer.state[param] = _fresh_adam_state(param)
            for key, value in (slots or {}).items():
                if isinstance(value, Tensor):
                    state[f"optimizer/{group}/{name}/{key}"] = value
    if ema is not None:
        for group, shadow in ema.shadow.items():
            state.update({f"ema/{group}/{k}": t for k, t in shadow.items()})
    return state


def _fresh_adam_state(param: Tensor) -> dict[str, Tensor]:
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def save_sharded(state: dict[str, Tensor], ckpt_dir: Path) -> None:
    """Every rank writes its shard of ``state`` into ``ckpt_dir/sharded`` (collective)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(ckpt_dir / SHARDED_DIR), save_distributed=True)
    dcp.save(_contiguous(state), storage_writer=writer)


def load_sharded(state: dict[str, Tensor], ckpt_dir: Path) -> None:
    """Fill ``state`` (``sharded_state(..., for_loading=True)``) in place from ``ckpt_dir/sharded``, whatever world
    size wrote it (collective when a process group is up).

    Raises:
        ValueError: the checkpoint lacks keys the run needs, or holds other shapes (names the first few).
    """
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(ckpt_dir / SHARDED_DIR))
    saved = reader.read_metadata().state_dict_metadata
    missing = sorted(k for k in state if k not in saved)
    reshaped = sorted(k for k in state if k in saved and tuple(saved[k].size) != tuple(state[k].shape))
    if missing or reshaped:
        raise ValueError(
            f"{ckpt_dir / SHARDED_DIR} does not match the run being resumed (missing {missing[:3]}, other shapes "
            f"{reshaped[:3]}): it was written with another student or objective."
        )
    wanted = {k: t for k, t in state.items() if k in saved}
    dcp.load(wanted, storage_reader=reader)


def read_sharded(ckpt_dir: Path, prefix: str) -> dict[str, dict[str, Tensor]]:
    """``{group: {name: whole tensor}}`` of the keys under ``prefix`` (``trainable`` or ``ema``), read in this one
    process from every rank's shard: how export, eval and sample consolidate a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(ckpt_dir / SHARDED_DIR))
    saved = reader.read_metadata().state_dict_metadata
    wanted = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in saved.items()
        if key.startswith(f"{prefix}/")
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in wanted.items():
        _, group, name = key.split("/", 2)
        out.setdefault(group, {})[name] = tensor
    return out


def saved_keys(ckpt_dir: Path) -> set[str]:
    """The tensor names a sharded checkpoint holds (read from the shards' headers)."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.HuggingFaceStorageReader(str(ckpt_dir / SHARDED_DIR)).read_metadata().state_dict_metadata)


def has_sharded(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / SHARDED_DIR).is_dir()


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v if v.is_contiguous() else v.contiguous() for k, v in state.items()}
