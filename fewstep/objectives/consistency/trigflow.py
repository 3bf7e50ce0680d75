"""TrigFlow view of any fewstep denoiser, and forward-mode AD through diffusers models.

sCM, rCM and TBCM work in TrigFlow coordinates ``x_u = cos u·x0 + sin u·z`` (σ_d = 1, ``u ∈ [0, π/2]``) on
``F = cos u·z − sin u·x0 = dx_u/du``. A VP or flow teacher is ported to them with the general rule: rescale
the input, map time to the equal-SNR time, convert the output:

* flow (SD3, Flux): ``s = sin u/(cos u + sin u)``, ``c_in = 1/(cos u + sin u)`` (``x_rf = c_in·x_trig``), the backbone
  sees ``timestep_scale·s`` (rCM's ``denoiser_scaling``);
* VP (SD1.5, SDXL): ``α² + σ² = 1`` already, ``c_in = 1``; the backbone sees the **continuous** training index whose
  log-SNR equals ``2·log(cot u)`` (linear interpolation in log-SNR, the ``VPSchedule`` convention), so ``∂F/∂u``
  goes through the time embedding instead of vanishing at a rounded index;
* TrigFlow-native models: as they are.

Every coefficient is a torch function of ``u``, so ``torch.func.jvp`` differentiates through the wrapper too.
``route_attention`` (``fewstep.kernels``) lets it run through diffusers' attention (and works around torch 2.13's
``group_norm`` forward-AD failure on non-contiguous input).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from fewstep.kernels import route_attention
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import bcast, to_x0_eps
from fewstep.noise.schedules import Schedule

HALF_PI = math.pi / 2


def vp_log_snr_table(schedule: Schedule) -> Tensor:
    """``log(ᾱ_n / (1 − ᾱ_n))`` for the training indices ``n = 0..N−1`` (descending), float64."""
    acp = schedule.alphas_cumprod.double()
    return torch.log(acp) - torch.log1p(-acp)


def u_range(schedule: Schedule) -> tuple[float, float]:
    """The TrigFlow angles a backbone on ``schedule`` was trained on: VP from index 0 to N−1, else ``(0, π/2)``."""
    if schedule.kind != "vp":
        return 0.0, HALF_PI
    table = vp_log_snr_table(schedule)
    return float(torch.atan(torch.exp(-table[0] / 2))), float(torch.atan(torch.exp(-table[-1] / 2)))


def vp_index_from_u(schedule: Schedule, u: Tensor) -> Tensor:
    """The continuous VP training index with log-SNR ``2·log(cot u)``, differentiable in ``u``, clamped to [0, N−1]."""
    table = vp_log_snr_table(schedule).to(u.device)  # descending in n
    asc = table.flip(0)
    n_max = table.shape[0] - 1
    lsnr = (2 * (torch.log(torch.cos(u)) - torch.log(torch.sin(u)))).double().clamp(float(asc[0]), float(asc[-1]))
    pos = torch.searchsorted(asc, lsnr.detach()).clamp(1, n_max)
    lo, hi = asc[pos - 1], asc[pos]
    frac = (lsnr - lo) / (hi - lo)
    return (n_max - (pos - 1).double() - frac).float()


def trig_coefficients(schedule: Schedule, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_in, timestep, α_native, σ_native)`` of the wrapper at angles ``u`` ``[b]``.

    The backbone is called on ``c_in·x_trig`` at ``timestep``; its output is converted with ``(α, σ)`` of its native
    level, whose SNR equals ``cot² u``.
    """
    u = u.float()
    cos, sin = torch.cos(u), torch.sin(u)
    if schedule.kind == "flow":
        c_in = 1 / (cos + sin)
        s = sin * c_in  # s = sin u / (cos u + sin u)
        return c_in, s * schedule.timestep_scale, 1 - s, s
    if schedule.kind == "vp":
        return torch.ones_like(u), vp_index_from_u(schedule, u), cos, sin
    if schedule.kind == "trigflow":
        return torch.ones_like(u), schedule.model_timestep(u / HALF_PI), cos, sin
    raise ValueError(
        f"No TrigFlow wrapper for a {schedule.kind!r} schedule; sCM/rCM/TBCM support VP, flow and TrigFlow teachers."
    )


def trig_raw(denoiser: Denoiser, x: Tensor, u: Tensor, cond: Conditioning) -> Tensor:
    """The backbone's native output at TrigFlow ``(x_u, u)`` (input scaled, time mapped), fp32."""
    c_in, timestep, _, _ = trig_coefficients(denoiser.schedule, u)
    x_in = (bcast(c_in, x) * x.float()).to(denoiser.dtype)
    return denoiser._adapter(denoiser.backbone, x_in, timestep.to(x.device), cond).float()


def trig_from_raw(denoiser: Denoiser, raw: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """TrigFlow ``F̂ = cos u·ε̂ − sin u·x̂0`` from a native output at ``(x_u, u)`` (affine in ``raw``)."""
    c_in, _, alpha, sigma = trig_coefficients(denoiser.schedule, u)
    pred = to_x0_eps(raw, bcast(c_in, x) * x.float(), alpha, sigma, denoiser.prediction_type)
    return bcast(torch.cos(u.float()), x) * pred.eps - bcast(torch.sin(u.float()), x) * pred.x0


def trig_F(denoiser: Denoiser, x: Tensor, u: Tensor, cond: Conditioning) -> Tensor:
    """``F_θ(x_u, u)`` of a denoiser seen in TrigFlow coordinates (σ_d = 1). Differentiable in ``x``, ``u`` and θ."""
    return trig_from_raw(denoiser, trig_raw(denoiser, x, u, cond), x, u)


def teacher_trig_velocity(
    teacher: Teacher,
    x: Tensor,
    u: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float | Tensor,
) -> Tensor:
    """The teacher's guided TrigFlow velocity ``dx_u/du = F_T^cfg(x_u, u)`` (Imagen CFG on raw outputs)."""
    d = teacher.denoiser
    with torch.no_grad(), teacher.view():
        if not isinstance(guidance_scale, Tensor) and guidance_scale == 1.0:
            raw = trig_raw(d, x, u, cond)
        else:
            uncond = uncond if uncond is not None else teacher.uncond_like(cond)
            if uncond is None:
                raise ValueError("Teacher guidance w != 1 needs an unconditional input; this teacher has none.")
            both = trig_raw(d, torch.cat([x, x]), torch.cat([u, u]), Conditioning.cat([uncond, cond]))
            out_u, out_c = both.chunk(2)
            w = bcast(torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device), out_u)
            raw = out_u + w * (out_c - out_u)
        return trig_from_raw(d, raw, x, u)


def trig_noise(x0: Tensor, u: Tensor, z: Tensor) -> Tensor:
    """``x_u = cos u·x0 + sin u·z`` (σ_d = 1); ``u`` a scalar or ``[b]``."""
    return bcast(torch.cos(u), x0) * x0 + bcast(torch.sin(u), x0) * z


def consistency_fn(F_hat: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """sCM's ``f(x_u, u) = cos u·x_u − sin u·F̂`` (= x̂0; ``f(x, 0) = x`` by construction)."""
    return bcast(torch.cos(u.float()), x) * x.float() - bcast(torch.sin(u.float()), x) * F_hat


# ---------------------------------------------------------------------------------------------------------------------
# Forward-mode AD through diffusers models
# ---------------------------------------------------------------------------------------------------------------------


def student_F_and_tangent(
    denoiser: Denoiser,
    x: Tensor,
    u: Tensor,
    cond: Conditioning,
    dx: Tensor,
    du: Tensor,
    method: str = "jvp",
    fd_size: float = 1e-4,
    with_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(F_θ(x, u), ∂_x F·dx + ∂_u F·du)``: the student's output and its directional derivative.

    Args:
        denoiser: the student's denoiser (any backbone; seen through the TrigFlow wrapper).
        x, u: primal point, ``[b, ...]`` and ``[b]``.
        cond: the student's conditioning.
        dx, du: tangent. sCM passes ``(cos u·sin u·F_T, cos u·sin u)`` so the tangent is ``cos u sin u·dF/du``.
        method: ``jvp`` (``torch.func.jvp``) or ``finite_difference`` (central, step ``fd_size``; rCM's fallback).
        with_grad: keep the autograd graph of the primal (the JVP's primal output backpropagates like a plain
            forward); the tangent is always detached.
    """
    fn = lambda x_, u_: trig_F(denoiser, x_, u_, cond)  # noqa: E731
    grad_ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    if method == "jvp":
        with grad_ctx, route_attention(denoiser.backbone):
            out, tangent = torch.func.jvp(fn, (x.float(), u.float()), (dx.float(), du.float()))
        return out, tangent.detach()
    if method == "finite_difference":
        h = fd_size
        with torch.no_grad():
            plus = fn(x.float() + h * dx.float(), u.float() + h * du.float())
            minus = fn(x.float() - h * dx.float(), u.float() - h * du.float())
        with grad_ctx:
            out = fn(x.float(), u.float())
        return out, ((plus - minus) / (2 * h)).detach()
    raise ValueError(f"Unknown tangent method {method!r}; use 'jvp' or 'finite_difference'.")
