"""What a run shows while it trains: scalars to tensorboard (accelerate trackers) and sample-grid PNGs.

Sample grids: one row per student step count (``train.sample_steps``), the same fixed noise and conditioning at
every logged step, so rows are comparable across a run. Files: ``<run_dir>/samples/step_XXXXXXXX.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.models.conditioning import Conditioning

MIN_TILE_PIXELS = 64  # tiny images (digits are 8×8) are enlarged (nearest) so a grid is readable


def grid_image(rows: list[Tensor]) -> Image.Image:
    """A PIL image of ``rows`` (each ``[n, c, h, w]`` in [0, 1], c = 1 or 3): one row of tiles per entry."""
    n, c, h, w = rows[0].shape
    scale = max(1, math.ceil(MIN_TILE_PIXELS / max(h, w)))
    grid = torch.stack([r.float().clamp(0, 1).cpu() for r in rows])  # [rows, n, c, h, w]
    grid = grid.permute(2, 0, 3, 1, 4).reshape(c, len(rows) * h, n * w)  # rows of tiles
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if c == 1 else np.ascontiguousarray(pixels), "L" if c == 1 else "RGB")


def save_sample_grid(rows: list[Tensor], path: Path) -> Path:
    """Write ``grid_image(rows)`` as a PNG (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows).save(path)
    return path


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
