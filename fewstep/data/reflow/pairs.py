"""Reflow couplings: solve the teacher ODE from stored noise and write ``(noise, sample, condition)`` exactly
, in sharded safetensors files with a manifest, resumable, one writer per rank.

Layout of a pair directory::

    pairs.json                       settings + shard list (``complete: true`` once every shard is written)
    shard-000000.safetensors         noise [n, ...], sample [n, ...], cond.<field> [n, ...] (fp32 as solved)
    shard-000001.safetensors         ...

Shard ``k`` holds pairs ``k·shard_size .. (k+1)·shard_size − 1``. Its noise and its conditions come from a
generator seeded by ``(seed, k)`` only, so a shard is the same bytes whichever rank writes it, in whichever order,
and after any number of restarts. Rank ``r`` of ``W`` writes the shards ``k ≡ r (mod W)``. A shard is written to a
temporary file and renamed, so a kill leaves either a complete shard or none: resuming skips the complete ones and
loses or duplicates nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.data.paths import listed_file
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher

MANIFEST = "pairs.json"
FORMAT = "fewstep-reflow-pairs/1"
NOISE_KEY, SAMPLE_KEY, COND_PREFIX = "noise", "sample", "cond."
_SHARED = (COND_PREFIX + "txt_ids", COND_PREFIX + "img_ids")  # Flux ids: one per shard, not per pair

# (shard_index, num_pairs, generator) -> (cond, uncond) for the pairs of that shard
ConditionFn = Callable[[int, int, torch.Generator], tuple[Conditioning, Conditioning | None]]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of shard ``index``: its noise, then its conditions, are drawn from it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning <-> flat tensors
# ---------------------------------------------------------------------------------------------------------------------


def flatten_cond(cond: Conditioning) -> dict[str, Tensor]:
    """``Conditioning`` tensors as ``{"cond.<field>": tensor}`` (``cond.extra.<key>`` for custom inputs)."""
    out: dict[str, Tensor] = {}
    for f in dataclasses.fields(cond):
        value = getattr(cond, f.name)
        if f.name == "extra":
            out.update({f"{COND_PREFIX}extra.{k}": v for k, v in value.items() if isinstance(v, Tensor)})
        elif isinstance(value, Tensor):
            out[COND_PREFIX + f.name] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def unflatten_cond(tensors: dict[str, Tensor]) -> Conditioning:
    """Inverse of ``flatten_cond``."""
    fields: dict[str, Any] = {"extra": {}}
    for key, value in tensors.items():
        if not key.startswith(COND_PREFIX):
            continue
        name = key[len(COND_PREFIX) :]
        if name.startswith("extra."):
            fields["extra"][name[len("extra.") :]] = value
        else:
            fields[name] = value
    return Conditioning(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def pair_settings(
    teacher: Teacher, shape: tuple[int, ...], num_pairs: int, shard_size: int, taus: Tensor, guidance_scale: float,
    seed: int, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What identifies a pair set: resuming with different settings is refused."""
    return {
        "format": FORMAT,
        "num_pairs": int(num_pairs),
        "shard_size": int(shard_size),
        "shape": [int(s) for s in shape],
        "seed": int(seed),
        "guidance_scale": float(guidance_scale),
        "guidance_convention": "imagen: cfg = uncond + w * (cond - uncond); w = 1 disables guidance",
        "taus": [round(float(t), 8) for t in taus],
        "schedule": teacher.schedule.kind,
        "prediction_type": teacher.denoiser.prediction_type,
        "family": teacher.family,
        **(extra or {}),
    }


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("settings", {})
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise ValueError(
            f"{str(out_dir)!r} already holds pairs made with other settings ({', '.join(diff)} differ: "
            f"{diff}). Resume with the same settings, or write to a new directory."
        )


def _write_manifest(out_dir: Path, settings: dict[str, Any], shards: list[dict[str, Any]], complete: bool) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "complete": complete, "shards": shards}, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def _shard_complete(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return {NOISE_KEY, SAMPLE_KEY} <= set(f.keys())
    except (SafetensorError, OSError):
        return False


def solve_shard(
    teacher: Teacher,
    index: int,
    num: int,
    shape: tuple[int, ...],
    taus: Tensor,
    guidance_scale: float,
    conditions: ConditionFn,
    seed: int,
    batch_size: int,
    device: Any = "cpu",
) -> dict[str, Tensor]:
    """The tensors of shard ``index``: noise from its generator, then its conditions, then the teacher ODE
    (deterministic DDIM / flow Euler over ``taus``, CFG with ``guidance_scale``) in micro-batches."""
    gen = shard_generator(seed, index)
    noise = torch.randn((num, *shape), generator=gen, dtype=torch.float32)  # [n, ...] stored exactly
    cond, uncond = conditions(index, num, gen)
    samples = []
    for start in range(0, num, batch_size):
        rows = slice(start, min(start + batch_size, num))
        c = cond.index(rows).to(device) if cond.batch_size is not None else cond
        u = uncond.index(rows).to(device) if uncond is not None else None
        x = teacher.sample(noise[rows].to(device), c, taus, u, guidance_scale)
        samples.append(x.float().cpu())
    return {NOISE_KEY: noise, SAMPLE_KEY: torch.cat(samples), **flatten_cond(cond)}


def generate_pairs(
    teacher: Teacher,
    out_dir: str | Path,
    shape: tuple[int, ...],
    num_pairs: int,
    taus: Tensor,
    conditions: ConditionFn | None = None,
    guidance_scale: float | None = None,
    shard_size: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    accelerator: Any = None,
    progress: bool = True,
    extra_settings: dict[str, Any] | None = None,
) -> Path:
    """Write (or finish writing) a reflow pair set.

    Args:
        teacher: the frozen teacher whose ODE is solved.
        out_dir: the pair directory (created; an interrupted one is resumed).
        shape: one noise sample's shape, e.g. ``(4, 64, 64)`` SD1.5 latents or ``(2,)`` for a 2-D toy.
        num_pairs: total pairs over all ranks.
        taus: ``num_steps + 1`` descending τ levels of the teacher solver (``fewstep.solvers.grids.sampling_taus``
            gives the usual ones).
        conditions: ``(shard_index, n, generator) -> (cond, uncond)``; ``None``: unconditional.
        guidance_scale: CFG ``w`` (Imagen convention); default the teacher's own.
        shard_size: pairs per shard file.
        batch_size: pairs per teacher forward.
        seed: seeds every shard's noise and conditions.
        accelerator: gives this process's rank, world size and device (``None``: one CPU process).
        progress: show a tqdm bar (main process).
        extra_settings: more identifying settings for the manifest (e.g. the prompt file).

    Returns:
        ``out_dir``. The manifest says ``complete: true`` once all shards exist (written by rank 0).
    """
    out_dir = Path(out_dir)
    if num_pairs < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(
            f"num_pairs, shard_size, batch_size must be >= 1; got {num_pairs}, {shard_size}, {batch_size}."
        )
    w = float(teacher.guidance_scale if guidance_scale is None else guidance_scale)
    if w != 1.0 and teacher.null_cond is None and conditions is None:
        raise ValueError(f"guidance_scale={w} needs a conditional teacher with a null conditioning; use 1.0.")
    conditions = conditions or (lambda index, n, gen: (Conditioning(), None))
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else "cpu"
    settings = pair_settings(teacher, shape, num_pairs, shard_size, taus, w, seed, extra_settings)
    num_shards = -(-num_pairs // shard_size)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_settings(out_dir, settings)
        if not (out_dir / MANIFEST).is_file():
            _write_manifest(out_dir, settings, [], complete=False)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, settings)
    mine = [k for k in range(num_shards) if k % world == rank]
    todo = [k for k in mine if not _shard_complete(out_dir / shard_name(k))]
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), desc="reflow pairs (shards)", disable=not progress or rank != 0
    )
    for k in todo:
        n = min(shard_size, num_pairs - k * shard_size)
        tensors = solve_shard(teacher, k, n, tuple(shape), taus, w, conditions, seed, batch_size, device)
        tmp = out_dir / f".{shard_name(k)}.rank{rank}.tmp"
        save_file(tensors, str(tmp), metadata={"index": str(k), "first_pair": str(k * shard_size)})
        os.replace(tmp, out_dir / shard_name(k))  # atomic: a kill leaves the whole shard or none
        bar.update(1)
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        missing = [k for k in range(num_shards) if not _shard_complete(out_dir / shard_name(k))]
        if missing:
            raise RuntimeError(
                f"Shards {missing[:5]} of {str(out_dir)!r} are missing after generation; rerun to resume."
            )
        shards = [
            {
                "file": shard_name(k),
                "first_pair": k * shard_size,
                "num_pairs": min(shard_size, num_pairs - k * shard_size),
            }
            for k in range(num_shards)
        ]
        _write_manifest(out_dir, settings, shards, complete=True)
        for stale in out_dir.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class PairDataset:
    """A complete pair directory as ``batch(idx) -> (noise, sample, cond)``. Rows are read from the memory-mapped
    shards (``safe_open(...).get_slice``), so a random batch costs its own rows only, whatever the shard size; the
    last ``cache_shards`` shard handles stay open.

    Args:
        path: the pair directory (``pairs.json`` + shards).
        cache_shards: how many shard handles to keep open.
    """

    def __init__(self, path: str | Path, cache_shards: int = 64) -> None:
        self.path = Path(path).expanduser()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"data.path {str(self.path)!r} has no {MANIFEST}: it is not a reflow pair directory. Generate one "
                "with `fewstep pairs <recipe>` (fewstep.data.reflow.generate_pairs)."
            )
        data = json.loads(manifest.read_text())
        if not data.get("complete"):
            raise ValueError(
                f"The pair set {str(self.path)!r} is incomplete (generation was interrupted). Run the same "
                "generation command again: it resumes and skips the shards already written."
            )
        self.settings: dict[str, Any] = data["settings"]
        self.shards: list[dict[str, Any]] = data["shards"]
        for shard in self.shards:  # names come from the file: each must stay inside the pair directory
            listed_file(self.path, shard.get("file") if isinstance(shard, dict) else None, manifest)
        self.shard_size = int(self.settings["shard_size"])
        self.num_pairs = int(self.settings["num_pairs"])
        self.cache_shards = max(1, cache_shards)
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self.num_pairs

    def handle(self, k: int) -> Any:
        """The open ``safe_open`` handle of shard ``k``."""
        if k not in self._handles:
            path = listed_file(self.path, self.shards[k]["file"], self.path / MANIFEST)
            if not path.is_file():
                raise FileNotFoundError(f"Shard {str(path)!r} listed in {MANIFEST} is missing; regenerate the pairs.")
            self._handles[k] = safe_open(str(path), "pt")
            while len(self._handles) > self.cache_shards:
                self._handles.popitem(last=False)
        self._handles.move_to_end(k)
        return self._handles[k]

    def row(self, i: int) -> dict[str, Tensor]:
        """Every tensor of pair ``i`` (``[1, ...]``; shared Flux ids whole)."""
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair {i} is outside 0..{self.num_pairs - 1}")
        k, r = divmod(int(i), self.shard_size)
        f = self.handle(k)
        return {key: f.get_tensor(key) if key in _SHARED else f.get_slice(key)[r : r + 1] for key in f.keys()}

    def batch(self, idx: list[int]) -> tuple[Tensor, Tensor, Conditioning]:
        """``(noise [b, ...], sample [b, ...], cond)`` of pairs ``idx``, in that order."""
        rows = [self.row(i) for i in idx]
        merged = {key: rows[0][key] if key in _SHARED else torch.cat([row[key] for row in rows]) for key in rows[0]}
        return merged[NOISE_KEY], merged[SAMPLE_KEY], unflatten_cond(merged)
