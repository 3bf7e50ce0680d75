"""Teacher trajectory caches for TBCM: CFG rollouts of the teacher recorded as
``(x_u, u, F_T)`` in TrigFlow coordinates, sharded safetensors on disk with a manifest, resumable after a kill.

Layout of a cache directory::

    manifest.json            {"settings": {...}, "shards": {"00000": {"file": ..., "rows": n}, ...}}
    shard_00000.safetensors  x [n, ...], u [n], F [n, ...], x0 [n, ...], cond.<field> [n, ...], shared.<field>

A shard is written to a temporary file and renamed into place, then the manifest is rewritten the same way; a shard
counts only once the manifest lists it. Shard ``k`` is a pure function of ``(settings, seed, k, its conditioning)``,
so a build killed at any point and resumed has neither lost nor duplicated shards (stray files are overwritten).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.data.paths import listed_file
from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import bcast
from fewstep.solvers.grids import teacher_taus
from fewstep.solvers.steps import ddim_step

MANIFEST = "manifest.json"
_SHARED = ("txt_ids", "img_ids")


def to_trigflow(x: Tensor, alpha: Tensor, sigma: Tensor, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A native state and prediction as TrigFlow ``(x_u, u, F)``: ``x_u = x/sqrt(α² + σ²)``, ``u = atan2(σ, α)``,
    ``F = cos u·ε̂ − sin u·x̂0``."""
    norm = torch.sqrt(alpha**2 + sigma**2)
    u = torch.atan2(sigma, alpha)
    F = bcast(torch.cos(u), x0) * eps - bcast(torch.sin(u), x0) * x0
    return x.float() / bcast(norm, x), u.float(), F.float()


def lognormal_level_weights(u: Tensor, p_mean: float, p_std: float) -> Tensor:
    """Row weights ``[n]`` that make rows at a few distinct trajectory levels follow sCM's training distribution
    ``tan u ~ LogNormal(p_mean, p_std)``: each level gets the lognormal mass of the angles nearest to it (between the
    midpoints to its neighbours), shared by its rows. Any rollout grid (VP, flow, shifted) works."""
    levels, inverse, counts = torch.unique(u.double(), return_inverse=True, return_counts=True)  # ascending
    edges = torch.cat([levels.new_zeros(1), (levels[1:] + levels[:-1]) / 2, levels.new_full((1,), math.pi / 2)])
    cdf = torch.special.ndtr((torch.log(torch.tan(edges)) - p_mean) / p_std)  # tan(0) = 0 → 0, tan(π/2) → 1
    mass = (cdf[1:] - cdf[:-1]).clamp(min=1e-12)
    return (mass / counts)[inverse]


def rollout_shard(
    teacher: Teacher,
    cond: Conditioning,
    uncond: Conditioning | None,
    noise: Tensor,
    num_steps: int,
    points: int,
    guidance_scale: float,
    generator: torch.Generator,
    level_jitter: bool = True,
) -> dict[str, Tensor]:
    """One CFG rollout of the teacher from ``noise`` ``[b, ...]``; ``points`` recorded levels per trajectory.

    The levels are the teacher's own grid (``teacher_taus``). With ``level_jitter`` it is offset by a random fraction
    of a step (drawn from ``generator``), so the levels of many shards cover the time axis instead of repeating
    ``num_steps`` values.

    Returns the shard's tensors: ``x``, ``u``, ``F`` (``[b·points, ...]``), ``x0`` (the trajectory's end, per row),
    ``cond.<field>`` per row and ``shared.<field>`` (Flux ids).
    """
    b = noise.shape[0]
    keep = torch.randperm(num_steps, generator=generator)[: min(points, num_steps)].sort().values.tolist()
    offset = float(torch.rand((), generator=generator)) - 0.5 if level_jitter else 0.0
    taus = teacher_taus(teacher.schedule, num_steps, num_tokens(teacher.denoiser, noise.shape), offset)
    x, rows = noise.float(), []
    schedule = teacher.schedule
    for i in range(num_steps):
        tau = taus[i].expand(b)
        pred = teacher.predict(x, tau, cond, uncond, guidance_scale=guidance_scale)
        if i in keep:
            rows.append(to_trigflow(x, schedule.alpha(tau), schedule.sigma(tau), pred.x0, pred.eps))
        x = ddim_step(schedule, pred, taus[i + 1].expand(b))
    shard = {
        "x": torch.cat([r[0] for r in rows]),
        "u": torch.cat([r[1] for r in rows]),
        "F": torch.cat([r[2] for r in rows]),
        "x0": x.float().repeat(len(rows), *[1] * (x.ndim - 1)),
    }
    for f in dataclasses.fields(cond):
        value = getattr(cond, f.name)
        if isinstance(value, Tensor):
            key = f"shared.{f.name}" if f.name in _SHARED else f"cond.{f.name}"
            shard[key] = value if f.name in _SHARED else value.repeat(len(rows), *[1] * (value.ndim - 1))
    return {k: v.detach().cpu().contiguous() for k, v in shard.items()}


class TrajectoryCache:
    """A sharded, resumable cache of teacher trajectory points.

    Args:
        root: the cache directory (created).
        settings: what the shards depend on (teacher, steps, guidance, shape, seed); a cache built with other
            settings is refused with the fix.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.settings = json.loads(json.dumps(settings))
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = self._read_manifest()
        self._loaded: dict[str, dict[str, Tensor]] = {}

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"settings": self.settings, "shards": {}}
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
            raise ValueError(f"{path} is not a trajectory cache manifest (no `shards` mapping): delete {self.root}.")
        for entry in manifest["shards"].values():
            listed_file(self.root, entry.get("file") if isinstance(entry, dict) else None, path)
        if manifest.get("settings") != self.settings:
            raise ValueError(
                f"The trajectory cache {str(self.root)!r} was built with other settings ({manifest.get('settings')}) "
                f"than these ({self.settings}). Delete it or point objective.cache_dir elsewhere."
            )
        return manifest

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def has(self, index: int) -> bool:
        return f"{index:05d}" in self.manifest["shards"]

    def write(self, index: int, shard: dict[str, Tensor]) -> None:
        """Write shard ``index`` atomically, then list it in the manifest (atomically)."""
        name = f"shard_{index:05d}.safetensors"
        tmp = self.root / f"{name}.tmp"
        save_file(shard, str(tmp))
        os.replace(tmp, self.root / name)
        self.manifest["shards"][f"{index:05d}"] = {"file": name, "rows": int(shard["u"].shape[0])}
        tmp_manifest = self.root / f"{MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp_manifest, self.root / MANIFEST)

    def shard(self, key: str) -> dict[str, Tensor]:
        if key not in self._loaded:
            if len(self._loaded) >= 4:  # keep a few shards in memory
                self._loaded.pop(next(iter(self._loaded)))
            path = listed_file(self.root, self.manifest["shards"][key]["file"], self.root / MANIFEST)
            self._loaded[key] = load_file(str(path))
        return self._loaded[key]

    def sample(
        self, n: int, generator: torch.Generator | None = None, weight: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[dict[str, Tensor], Conditioning]:
        """``n`` rows of one random listed shard: ``({x, u, F, x0}, cond)``; uniform over its rows, or drawn with
        replacement in proportion to ``weight(u)`` (e.g. ``lognormal_level_weights``)."""
        keys = sorted(self.manifest["shards"])
        if not keys:
            raise ValueError(f"The trajectory cache {str(self.root)!r} has no shards yet.")
        key = keys[int(torch.randint(len(keys), (1,), generator=generator))]
        shard = self.shard(key)
        if weight is None:
            rows = torch.randint(shard["u"].shape[0], (n,), generator=generator)
        else:
            rows = torch.multinomial(weight(shard["u"]).double(), n, replacement=True, generator=generator)
        fields = {k.split(".", 1)[1]: v[rows] for k, v in shard.items() if k.startswith("cond.")}
        fields.update({k.split(".", 1)[1]: v for k, v in shard.items() if k.startswith("shared.")})
        return {k: shard[k][rows] for k in ("x", "u", "F", "x0")}, Conditioning(**fields)


def fill_cache(
    cache: TrajectoryCache,
    teacher: Teacher,
    batches: Iterable[Any],
    num_shards: int,
    noise_shape: tuple[int, ...],
    num_steps: int,
    points: int,
    guidance_scale: float,
    seed: int = 0,
    progress: bool = True,
    level_jitter: bool = True,
) -> TrajectoryCache:
    """Build (or resume) ``num_shards`` shards, one per batch of ``batches`` (``Batch`` with ``cond``/``uncond``).

    Shard ``k`` uses batch ``k`` of the iterable and noise seeded by ``(seed, k)``; shards already listed in the
    manifest are skipped (their batches are still consumed, so the pairing is the same after a resume).
    """
    bar = tqdm(total=num_shards, initial=cache.num_shards, desc="trajectories", disable=not progress)
    for k, batch in zip(range(num_shards), batches):
        if cache.has(k):
            continue
        shard = make_shard(teacher, batch, k, noise_shape, num_steps, points, guidance_scale, seed, level_jitter)
        cache.write(k, shard)
        bar.update(1)
    bar.close()
    return cache


def make_shard(
    teacher: Teacher,
    batch: Any,
    index: int,
    noise_shape: tuple[int, ...],
    num_steps: int,
    points: int,
    guidance_scale: float,
    seed: int,
    level_jitter: bool = True,
) -> dict[str, Tensor]:
    """Shard ``index`` for ``batch``: a pure function of its arguments (noise, point choice and grid offset
    seeded)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    b = batch.cond.batch_size or 1
    noise = torch.randn((b, *noise_shape), generator=generator)
    device = next(teacher.denoiser.parameters()).device
    uncond = batch.uncond if not math.isclose(guidance_scale, 1.0) else None
    return rollout_shard(teacher, batch.cond, uncond, noise.to(device), num_steps, points, guidance_scale, generator,
                         level_jitter)  # fmt: skip
