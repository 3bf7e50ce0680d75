"""Pure single steps between noise levels. Each is one formula on ``(x̂0, ε̂)``.

Every function takes the schedule and target level(s) as ``[b]`` tensors (or floats) and returns a new tensor;
none holds state. For RF, ``ddim_step`` *is* the Euler step (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.noise.convert import Prediction, bcast
from fewstep.noise.schedules import Schedule


def _level(schedule: Schedule, tau: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    tau = torch.as_tensor(tau, dtype=torch.float32, device=like.device)
    if tau.ndim == 0:
        tau = tau.expand(like.shape[0])
    return bcast(schedule.alpha(tau), like), bcast(schedule.sigma(tau), like)


def noise_to(schedule: Schedule, x0: Tensor, noise: Tensor, tau: Tensor | float) -> Tensor:
    """Forward process ``x_τ = α(τ)·x0 + σ(τ)·ε``. Computed directly (never via a scheduler's ``add_noise``)."""
    a, s = _level(schedule, tau, x0)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


def ddim_step(schedule: Schedule, pred: Prediction, tau_to: Tensor | float) -> Tensor:
    """Deterministic step ``x_τ' = α(τ')·x̂0 + σ(τ')·ε̂`` (DDIM η=0, Euler for RF, works upwards too)."""
    a, s = _level(schedule, tau_to, pred.x0)
    return a * pred.x0 + s * pred.eps


def renoise_step(schedule: Schedule, x0: Tensor, tau_to: Tensor | float, noise: Tensor) -> Tensor:
    """Consistency / LCM / DMD multistep re-noise ``x_τ' = α(τ')·x̂0 + σ(τ')·z`` with fresh ``z``."""
    a, s = _level(schedule, tau_to, x0)
    return a * x0.float() + s * noise.float()


def transition_coeffs(
    schedule: Schedule, tau_s: Tensor | float, tau_t: Tensor | float, like: Tensor
) -> tuple[Tensor, Tensor]:
    """``p(x_t | x_s) = N(α_{t|s}·x_s, σ²_{t|s}·I)`` for ``t ≥ s``: ``(α_{t|s}, σ_{t|s})`` shaped like ``like``.

    ``α_{t|s} = α_t / α_s``, ``σ²_{t|s} = σ_t² − α²_{t|s}·σ_s²``.
    """
    a_s, s_s = _level(schedule, tau_s, like)
    a_t, s_t = _level(schedule, tau_t, like)
    a_ts = a_t / a_s
    var = (s_t**2 - a_ts**2 * s_s**2).clamp(min=0)
    return a_ts, var.sqrt()


def transition(schedule: Schedule, x_s: Tensor, tau_s: Tensor | float, tau_t: Tensor | float, noise: Tensor) -> Tensor:
    """Sample ``x_t ~ p(x_t | x_s)``: forward-noise an already noisy state to a higher level."""
    a_ts, s_ts = transition_coeffs(schedule, tau_s, tau_t, x_s)
    return a_ts * x_s.float() + s_ts * noise.float()


def tcd_step(schedule: Schedule, pred: Prediction, tau_to: Tensor | float, gamma: float, noise: Tensor) -> Tensor:
    """TCD γ-step: deterministic to ``τ_m = (1 − γ)·τ'``, then forward-noise ``τ_m → τ'``.

    γ = 0 is DDIM, γ = 1 a pure re-noise step.
    """
    tau_to = torch.as_tensor(tau_to, dtype=torch.float32, device=pred.x0.device)
    tau_m = (1 - gamma) * tau_to
    x_m = ddim_step(schedule, pred, tau_m)
    if gamma == 0:
        return x_m
    return transition(schedule, x_m, tau_m, tau_to, noise)
