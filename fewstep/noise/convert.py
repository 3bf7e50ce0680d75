"""Conversions between prediction types. Pure fp32 functions of ``(output, x_τ, α, σ)``.

Every conversion is affine in the network output, so classifier-free guidance may be applied to raw outputs
before converting. Prediction types:

* ``epsilon``: ε̂
* ``sample``: x̂0
* ``v_prediction``: ``v = α·ε − σ·x0`` (needs α² + σ² = 1; equals TrigFlow F with α = cos u)
* ``flow``: rectified-flow velocity with diffusers' sign, ``u = ε − x0`` (= dx/ds)
* ``trigflow``: ``F = cos u·z − sin u·x0`` with σ_d = 1 (the same formula as ``v_prediction``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow", "trigflow")


@dataclass
class Prediction:
    """A denoiser's answer in the canonical parameterisation: clean estimate and noise estimate, both ``[b, ...]``."""

    x0: Tensor
    eps: Tensor


def bcast(coef: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient ``[b]`` (or a scalar) as float32 ``[b, 1, …, 1]`` on ``like``'s device, so that it
    broadcasts against ``like`` ``[b, ...]``."""
    coef = torch.as_tensor(coef, dtype=torch.float32, device=like.device)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def rescale_to_norm(x: Tensor, ref: Tensor, dim: int | tuple[int, ...] = -1, min_norm: float = 0.0) -> Tensor:
    """``x · ‖ref‖ / ‖x‖`` with the L2 norms taken over ``dim``: ``x``'s direction at ``ref``'s length.

    The guided-output renormalisation of Qwen-Image's true CFG (over each packed token) and of the DMD real-score
    option ``real_cfg_normalize`` (over each sample). ``min_norm`` clamps ``‖x‖`` from below (0: no clamp, the
    pipeline's own arithmetic).
    """
    x_norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    if min_norm > 0:
        x_norm = x_norm.clamp(min=min_norm)
    return x * (torch.linalg.vector_norm(ref, dim=dim, keepdim=True) / x_norm)


def cap_to_norm(x: Tensor, ref: Tensor, factor: float, dim: int | tuple[int, ...] = -1) -> Tensor:
    """``x`` where ``‖x‖ ≤ factor·‖ref‖``, else ``rescale_to_norm(x, factor·ref)``: the norm capped, never raised.

    Z-Image's ``cfg_normalization`` (over each sample), a one-sided form of the true-CFG rescale above."""
    limit = factor * ref
    over = torch.linalg.vector_norm(x, dim=dim, keepdim=True) > torch.linalg.vector_norm(limit, dim=dim, keepdim=True)
    return torch.where(over, rescale_to_norm(x, limit, dim), x)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Prediction type {prediction_type!r} is not supported; supported are {', '.join(PREDICTION_TYPES)}."
        )
    return prediction_type


def to_x0_eps(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Prediction:
    """Convert a raw network output to ``(x̂0, ε̂)``.

    Args:
        output: network output ``[b, ...]`` in ``prediction_type``.
        x: the noisy input ``x_τ`` ``[b, ...]``.
        alpha, sigma: ``α(τ)``, ``σ(τ)`` of shape ``[b]`` (or broadcastable).
        prediction_type: one of ``PREDICTION_TYPES``.
    """
    out, x = output.float(), x.float()
    a, s = bcast(alpha, x), bcast(sigma, x)
    if prediction_type == "epsilon":
        return Prediction(x0=(x - s * out) / a, eps=out)
    if prediction_type == "sample":
        return Prediction(x0=out, eps=(x - a * out) / s)
    if prediction_type in ("v_prediction", "trigflow"):
        return Prediction(x0=a * x - s * out, eps=s * x + a * out)
    if prediction_type == "flow":  # x = (1-s)x0 + s·ε, u = ε − x0, with α = 1 − s and σ = s
        return Prediction(x0=x - s * out, eps=x + a * out)
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The network output that corresponds to ``(x0, ε)`` at level ``(α, σ)``: the regression target of each type."""
    x0, eps = x0.float(), eps.float()
    a, s = bcast(alpha, x0), bcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type in ("v_prediction", "trigflow"):
        return a * eps - s * x0
    if prediction_type == "flow":
        return eps - x0
    check_prediction_type(prediction_type)
    raise AssertionError("unreachable")


def velocity(pred: Prediction, d_alpha: Tensor, d_sigma: Tensor) -> Tensor:
    """Probability-flow ODE velocity ``dx/dτ = α'(τ)·x̂0 + σ'(τ)·ε̂``."""
    return bcast(d_alpha, pred.x0) * pred.x0 + bcast(d_sigma, pred.eps) * pred.eps


def score(pred: Prediction, sigma: Tensor) -> Tensor:
    """Tweedie score ``∇ log p_τ(x) ≈ −ε̂ / σ``."""
    return -pred.eps / bcast(sigma, pred.eps)
