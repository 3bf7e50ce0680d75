"""What a run shows while it trains: scalars to tensorboard (accelerate trackers) and sample-grid PNGs.

Sample grids: one row per student step count (``train.sample_steps``), the same fixed noise and conditioning at
every logged step, so rows are comparable across a run. Files: ``<run_dir>/samples/step_XXXXXXXX.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.data.images import save_sample_grid
from fewstep.models.conditioning import Conditioning


@torch.no_grad()
def write_samples(
    objective: Any,
    teacher: Any,
    noise: Tensor,
    cond: Conditioning,
    sample_steps: list[int],
    path: Path,
    seed: int = 0,
) -> Path:
    """Sample the student at each step count on fixed ``noise``/``cond``, decode and save one grid row per count."""
    from fewstep.models.loading import decode_latents

    sampler = objective.sampler()
    rows = []
    for num_steps in sample_steps:
        gen = torch.Generator().manual_seed(seed)  # re-noising samplers draw the same noise every time
        x0 = sampler(noise, cond, num_steps, gen)
        rows.append(decode_latents(teacher, x0).float())
    return save_sample_grid(rows, path)


def flatten_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
