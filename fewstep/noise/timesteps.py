"""Time samplers for training. Pure functions returning τ ∈ [0, 1]; sampling grids are in ``fewstep.solvers.grids``.

Each sampler takes ``n`` and a ``torch.Generator`` so that a synchronised generator gives identical draws on every
rank. Samplers that are defined on another time variable (EDM's lognormal σ) map to τ through the equal-SNR TrigFlow
angle ``τ = (2/π)·arctan(σ)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAU_EPS = 1e-4  # keeps continuous τ off the exact ends, where some conversions divide by α or σ


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
    """rfpp's U-shaped density ``p(t) ∝ cosh(a·(t − ½))`` sampled by inverting its CDF.

    CDF: ``F(t) = (sinh(a(t − ½)) + sinh(a/2)) / (2·sinh(a/2))`` ⇒ ``t = ½ + asinh((2F − 1)·sinh(a/2)) / a``.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a
    return t.float().clamp(0, 1)


def discrete(grid: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points from a discrete τ grid. Returns ``(tau, index)``."""
    idx = torch.randint(0, len(grid), (n,), generator=generator)
    return grid[idx].float(), idx
