"""Multi-step samplers built from the pure steps in ``steps.py``. A sampler takes a ``predict(x, τ) -> Prediction``
callable, so the same loop serves the teacher (with CFG), a student and a custom module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.noise.convert import Prediction
from fewstep.noise.schedules import Schedule
from fewstep.solvers.steps import ddim_step, renoise_step

PredictFn = Callable[[Tensor, Tensor], Prediction]


def _taus_b(tau: Tensor, x: Tensor) -> Tensor:
    return tau.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


def sample_ddim(predict: PredictFn, schedule: Schedule, noise: Tensor, taus: Tensor, progress: bool = False) -> Tensor:
    """DDIM (η = 0) / flow Euler: ``x ← α(τ')·x̂0 + σ(τ')·ε̂`` for consecutive levels ``taus[i] → taus[i+1]``.

    ``noise`` is used as ``x_{τ_0}`` as it is (diffusers' ``init_noise_sigma = 1`` for VP-DDIM and flow).
    """
    x = noise.float()
    steps = range(len(taus) - 1)
    for i in tqdm(steps, disable=not progress, desc="sampling", leave=False):
        pred = predict(x, _taus_b(taus[i], x))
        x = ddim_step(schedule, pred, _taus_b(taus[i + 1], x))
    return x


def fresh_noise(shape: Sequence[int], generator: torch.Generator | None, layout: Sequence[int] | None = None) -> Tensor:
    """Standard normal noise of ``shape`` (float32, drawn on the CPU). ``layout``: the axis order a pipeline draws it
    in, as a permutation of ``shape``'s axes (CogVideoX's ``[b, f, c, h, w]``: ``(0, 2, 1, 3, 4)``); the noise is drawn
    in that order and returned in ``shape``'s, so the same generator gives the pipeline's values."""
    if layout is None:
        return torch.randn(tuple(shape), generator=generator, device="cpu", dtype=torch.float32)
    drawn = torch.randn(tuple(shape[i] for i in layout), generator=generator, device="cpu", dtype=torch.float32)
    return drawn.permute(tuple(sorted(range(len(layout)), key=lambda i: layout[i])))  # the inverse permutation


def sample_consistency(
    predict: PredictFn,
    schedule: Schedule,
    noise: Tensor,
    taus: Tensor,
    generator: torch.Generator | None = None,
    layout: Sequence[int] | None = None,
) -> Tensor:
    """Multistep consistency sampling (LCM / CM / DMD multi-step): at each level predict x̂0, then re-noise to the
    next level with fresh noise (``fresh_noise``, in the pipeline's ``layout`` where it has its own); the last
    prediction is returned. ``taus`` are the ``num_steps`` input levels."""
    x = noise.float()
    x0 = x
    for i in range(len(taus)):
        x0 = predict(x, _taus_b(taus[i], x)).x0
        if i + 1 < len(taus):
            z = fresh_noise(x0.shape, generator, layout).to(x0.device)
            x = renoise_step(schedule, x0, _taus_b(taus[i + 1], x), z)
    return x0
