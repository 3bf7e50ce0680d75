"""Pure distribution-matching math, shared by DMD2, Phased DMD, Decoupled DMD and rCM's DMD term.

Every function is a tensor formula without state or modules. Conventions: ``x`` is the generator's sample in the
denoiser's space ``[b, ...]``; ``x0_*`` are x0 predictions at the same noisy input; a *gradient* ``g`` is what the
generator should descend along (``x ← x − lr·g``), turned into a loss by ``injected_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.noise.convert import bcast, from_x0_eps

__all__ = [
    "backsim_depth",
    "ca_gradient",
    "denoising_loss",
    "dm_gradient",
    "gan_d_loss",
    "gan_g_loss",
    "injected_loss",
    "per_sample_l1",
    "project_radial",
    "subinterval_x0_target",
    "subinterval_flow_target",
]


def per_sample_l1(x: Tensor, min_value: float = 1e-5) -> Tensor:
    """``mean_{C,H,W} |x|`` per sample, clamped ``≥ min_value``, shaped ``[b, 1, ...]`` to broadcast against ``x``."""
    return x.abs().flatten(1).mean(1).clamp(min=min_value).reshape(-1, *([1] * (x.ndim - 1)))


def dm_gradient(x0_fake: Tensor, x0_real: Tensor, x: Tensor, normalize: bool = True, min_norm: float = 1e-5) -> Tensor:
    """The distribution-matching gradient (DMD Eq. 7 with DMD1's normaliser).

    ``g = (x̂0_fake − x̂0_real) / mean_{C,H,W}|x − x̂0_real|``: descending along ``g`` moves ``x`` from the fake
    towards the real distribution. ``x0_real`` carries the teacher's CFG, ``x0_fake`` none.

    Args:
        x0_fake: the fake score's x0 prediction at ``(x_t, t)``, ``[b, ...]``.
        x0_real: the (guided) teacher's x0 prediction at the same ``(x_t, t)``, ``[b, ...]``.
        x: the generator sample ``x`` that was noised to ``x_t``, ``[b, ...]``.
        normalize: divide by the per-sample L1 distance to the real prediction (DMD2's code); ``False`` gives
            the raw difference (weights then belong to the caller).
        min_norm: lower clamp of the normaliser (rCM: 1e-5).

    Returns:
        ``g`` ``[b, ...]`` in fp32 with NaN/inf zeroed (DMD2 keeps ``nan_to_num`` on ``g``).
    """
    g = x0_fake.float() - x0_real.float()
    if normalize:
        g = g / per_sample_l1(x.float() - x0_real.float(), min_norm)  # DMD Eq. 7 normalisation
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def project_radial(g: Tensor, x: Tensor, min_norm_sq: float = 1e-12) -> Tensor:
    """Projected DMD: ``g`` without its per-sample component along the centred sample ``x_c = x − mean(x)``.

    ``g ← g − (⟨g, x_c⟩ / ⟨x_c, x_c⟩)·x_c`` per sample, in fp32. Under a guided real score much of the DM direction
    only scales each sample about its own mean, i.e. changes its contrast: descending along ``+x_c`` shrinks it and
    along ``−x_c`` stretches it, which is how CFG's over-saturation reaches a one-step DMD student. Removing that
    one direction keeps the part of ``g`` that changes what the sample shows; everything orthogonal to ``x_c``
    (including a uniform shift of the sample) passes unchanged.

    Args:
        g: the generator gradient ``[b, ...]``.
        x: the generator sample ``[b, ...]`` that ``g`` belongs to.
        min_norm_sq: below this ``⟨x_c, x_c⟩`` (a flat sample) nothing is removed.

    Returns:
        the projected ``g`` ``[b, ...]`` in fp32; ``⟨result, x_c⟩ = 0`` per sample.
    """
    g32, x32 = g.float().flatten(1), x.float().flatten(1)
    xc = x32 - x32.mean(dim=1, keepdim=True)  # [b, n]
    xc_sq = (xc * xc).sum(dim=1, keepdim=True)  # [b, 1]
    coef = (g32 * xc).sum(dim=1, keepdim=True) / xc_sq.clamp(min=min_norm_sq)
    coef = torch.where(xc_sq < min_norm_sq, torch.zeros_like(coef), coef)  # a flat sample: nothing to remove
    return (g32 - coef * xc).reshape(g.shape)


def ca_gradient(x0_real_uncond: Tensor, x0_real_cond: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """Decoupled DMD's CFG-augmentation direction: ``(w − 1)·(x̂0_T,∅ − x̂0_T,c)``.

    With ``x̂0_real = x̂0_∅ + w·(x̂0_c − x̂0_∅)`` the DMD direction splits as
    ``x̂0_F,c − x̂0_real = (x̂0_F,c − x̂0_T,c) + (w − 1)·(x̂0_T,∅ − x̂0_T,c)`` = DM term + CA term.
    """
    w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x0_real_cond.device)
    return bcast(w - 1.0, x0_real_cond) * (x0_real_uncond.float() - x0_real_cond.float())


def injected_loss(y: Tensor, g: Tensor) -> Tensor:
    """Gradient injection ``L = 0.5·mean((y − sg(y − g))²)``, so ``∂L/∂y = g / numel``."""
    y = y.float()
    return 0.5 * F.mse_loss(y, (y - g).detach(), reduction="mean")


def denoising_loss(
    x0_pred: Tensor, eps_pred: Tensor, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """The fake score's denoising loss in its native output space ("Fake-score loss").

    ε-prediction: ``‖ε̂ − ε‖²``; v: ``‖v̂ − v‖²``; flow: ``‖û − (ε − x0)‖²``; x0: ``‖x̂0 − x0‖²``.

    Args:
        x0_pred, eps_pred: the network's prediction converted to ``(x̂0, ε̂)`` ``[b, ...]``.
        x0, eps: the clean sample and the noise that made ``x_t`` ``[b, ...]``.
        alpha, sigma: ``α(τ)``, ``σ(τ)`` ``[b]``.
        prediction_type: the network's output type.
    """
    out = from_x0_eps(x0_pred, eps_pred, alpha, sigma, prediction_type)
    target = from_x0_eps(x0.detach(), eps, alpha, sigma, prediction_type)
    return F.mse_loss(out, target)


def gan_d_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Non-saturating logistic discriminator loss ``softplus(D(fake)) + softplus(−D(real))`` (DMD2)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(−D(fake))`` (DMD2)."""
    return F.softplus(-logits_fake.float()).mean()


def backsim_depth(step: int, seed: int, num_steps: int) -> int:
    """Backward-simulation depth ``k ~ U{0..K−1}`` for training step ``step`` (DMD2).

    Drawn from a generator seeded by ``(seed, step)``, so every rank picks the same ``k`` without a collective
    (the graph depends on it: DDP/FSDP would hang on a mismatch).
    """
    if num_steps <= 1:
        return 0
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(0, num_steps, (1,), generator=gen))


# ---------------------------------------------------------------------------------------------------------------------
# Phased DMD: score matching within a subinterval (Phased DMD Eqs. 12–13, 15)
# ---------------------------------------------------------------------------------------------------------------------


def subinterval_x0_target(
    x_s: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_ts: Tensor
) -> Tensor:
    """The x0-form denoising target when only ``x_s`` (``s > 0``) is known: ``x_s/α_s − α_t σ_s²/(α_s² σ_{t|s})·ε``.

    ``x_t = α_{t|s}·x_s + σ_{t|s}·ε``; the target is ``E[x0 | x_t]``-consistent in expectation over
    ``x0 | x_s`` (Phased DMD Eq. 15). At ``s = 0`` (``α_s = 1``, ``σ_s = 0``) it is ``x_s`` itself.
    All coefficients are ``[b]``.
    """
    x_s = x_s.float()
    a_s, s_s, a_t, s_ts = (bcast(c.float(), x_s) for c in (alpha_s, sigma_s, alpha_t, sigma_ts))
    return x_s / a_s - (a_t * s_s**2) / (a_s**2 * s_ts) * eps.float()


def subinterval_flow_target(
    x_s: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, sigma_ts: Tensor
) -> Tensor:
    """The velocity-form target ``ψ* = (α_s²σ_t + α_tσ_s²)/(α_s²σ_{t|s})·ε − x_s/α_s`` (Phased DMD Eq. 12)."""
    x_s = x_s.float()
    a_s, s_s, a_t, s_t, s_ts = (bcast(c.float(), x_s) for c in (alpha_s, sigma_s, alpha_t, sigma_t, sigma_ts))
    return (a_s**2 * s_t + a_t * s_s**2) / (a_s**2 * s_ts) * eps.float() - x_s / a_s
