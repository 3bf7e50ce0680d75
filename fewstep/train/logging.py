"""What a run shows while it trains: scalars to tensorboard (accelerate trackers) and sample-grid PNGs.

Sample grids: one row per student step count (``train.sample_steps``, labelled on the left), one column per fixed
noise and conditioning (its class or prompt on top), the same at every logged step, so grids are comparable across a
run. Files: ``<run_dir>/samples/step_XXXXXXXX.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    labels: Sequence[str] | None = None,
) -> Path:
    """Sample the student at each step count on fixed ``noise``/``cond``, decode and save one grid row per count,
    labelled with its step count; ``labels`` (default: the class labels in ``cond``) head the columns."""
    from fewstep.models.loading import decode_latents

    sampler = objective.sampler()
    rows = []
    for num_steps in sample_steps:
        gen = torch.Generator().manual_seed(seed)  # re-noising samplers draw the same noise every time
        x0 = sampler(noise, cond, num_steps, gen)
        rows.append(decode_latents(teacher, x0).float())
    if labels is None and cond.class_labels is not None:
        labels = [str(int(c)) for c in cond.class_labels]
    row_labels = [f"{n} step{'s' if n != 1 else ''}" for n in sample_steps]
    return save_sample_grid(rows, path, row_labels=row_labels, column_labels=labels)


def flatten_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
