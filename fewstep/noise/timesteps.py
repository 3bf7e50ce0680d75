"""Time samplers for training (ALGORITHMS §1, §4, §7.4) and sampling grids. Pure functions returning τ ∈ [0, 1].

Each sampler takes ``n`` and a ``torch.Generator`` so that a synchronised generator gives identical draws on every
rank (DESIGN §4). Samplers that are defined on another time variable (EDM's lognormal σ) map to τ through the
equal-SNR TrigFlow angle ``τ = (2/π)·arctan(σ)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform(n: int, generator: torch.Generator | None = None, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def logit_normal(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """SD3's logit-normal: ``τ = sigmoid(mean + std·z)``."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def lognormal_sigma(
    n: int, generator: torch.Generator | None = None, p_mean: float = -1.1, p_std: float = 2.0
) -> Tensor:
    """EDM / sCM lognormal noise level ``ln σ ~ N(P_mean, P_std²)`` mapped to τ on the TrigFlow angle."""
    sigma = torch.exp(p_mean + p_std * torch.randn(n, generator=generator))
    return torch.atan(sigma) / (math.pi / 2)


def u_shaped(n: int, generator: torch.Generator | None = None, a: float = 4.0) -> Tensor:
    """rfpp's U-shaped density ``p(t) ∝ cosh(a·(t − ½))`` sampled by inverting its CDF (ALGORITHMS §7.4).

    CDF: ``F(t) = (sinh(a(t − ½)) + sinh(a/2)) / (2·sinh(a/2))`` ⇒ ``t = ½ + asinh((2F − 1)·sinh(a/2)) / a``.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a
    return t.float().clamp(0, 1)


def discrete(grid: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points from a discrete τ grid. Returns ``(tau, index)``."""
    idx = torch.randint(0, len(grid), (n,), generator=generator)
    return grid[idx].float(), idx


def linspace_grid(num_steps: int, tau_max: float = 1.0, tau_min: float = 0.0, offset: float = 0.0) -> Tensor:
    """``num_steps + 1`` levels from ``tau_max`` down to ``tau_min`` (the boundaries of each sampling step).

    ``offset`` in ``[-1/2, 1/2)`` moves the interior levels toward ``tau_min`` by that fraction of a step; the ends
    stay (a jittered grid: many draws cover the time axis instead of repeating ``num_steps`` levels).
    """
    grid = torch.linspace(tau_max, tau_min, num_steps + 1)
    grid[1:-1] -= offset * (tau_max - tau_min) / num_steps
    return grid


def trailing_vp_grid(num_steps: int, num_train_timesteps: int = 1000, offset: float = 0.0) -> Tensor:
    """diffusers ``timestep_spacing="trailing"`` as τ levels (first step at index N-1), ending at the clean level.

    ``offset`` as in ``linspace_grid``, rounded to the nearest training index.
    """
    ratio = num_train_timesteps / num_steps
    idx = torch.round(torch.arange(num_train_timesteps, 0, -ratio)) - 1  # e.g. 999, 749, 499, 249
    idx[1:] = (idx[1:] - round(offset * ratio)).clamp(0, num_train_timesteps - 1)
    taus = (idx + 1) / num_train_timesteps
    return torch.cat([taus.float(), torch.zeros(1)])
