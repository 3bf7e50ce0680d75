"""Health metrics of distribution-matching runs (readable critic losses, collapse detection).

Logged every step under ``metrics/health/...``. "What healthy looks like" per recipe is in ``docs/dmd.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_stats(x: Tensor) -> dict[str, float]:
    """Mean, std and diversity of a batch ``[b, ...]``: the reference point for drift metrics."""
    x = x.detach().float()
    return {"mean": float(x.mean()), "std": float(x.std()), "diversity": diversity(x)}


def diversity(x: Tensor) -> float:
    """Mean pairwise distance ``‖x_i − x_j‖ / sqrt(2·D)`` over a batch: the per-element std of i.i.d. samples, 0 on
    collapse (every sample the same). NaN for a batch of one."""
    flat = x.detach().float().flatten(1)
    b, d = flat.shape
    if b < 2:
        return float("nan")
    dist = torch.cdist(flat, flat)  # [b, b]
    return float(dist.sum() / (b * (b - 1)) / (2 * d) ** 0.5)


def health_metrics(x: Tensor, reference: dict[str, float] | None) -> dict[str, float]:
    """Drift of the generator's samples ``x`` ``[b, ...]`` from the teacher's (``reference``, from
    ``sample_stats``): ``mean_drift`` (difference of means, in reference stds), ``std_ratio`` (1 is healthy),
    ``diversity`` and ``diversity_ratio`` (→ 0 on mode collapse)."""
    stats = sample_stats(x)
    out = {"sample_mean": stats["mean"], "sample_std": stats["std"], "diversity": stats["diversity"]}
    if reference is not None:
        ref_std = max(reference["std"], 1e-8)
        out["mean_drift"] = (stats["mean"] - reference["mean"]) / ref_std
        out["std_ratio"] = stats["std"] / ref_std
        if reference.get("diversity", 0.0) == reference.get("diversity", 0.0) and reference.get("diversity", 0.0) > 0:
            out["diversity_ratio"] = stats["diversity"] / reference["diversity"]
    return out
