"""Noise schedules in the one canonical parameterisation ``x_τ = α(τ)·x0 + σ(τ)·ε``, τ ∈ [0, 1], τ = 1 is noise.

Every schedule answers the same questions:

* ``alpha(τ)``, ``sigma(τ)`` and their derivatives ``d_alpha(τ)``, ``d_sigma(τ)`` (for ODE velocities),
* ``model_timestep(τ)``: what the backbone is fed (integer index for VP, ``1000·s`` for SD3/Wan, ``s`` for Flux),
* ``tau_from_model_timestep(t)``: the inverse, used to read a diffusers scheduler's timesteps,
* ``shift(τ)``: the sampling-time warp a backbone was trained with (identity unless it is a shifted flow).

All math is fp32 (the coefficients that combine model outputs are never computed in the model's dtype). Schedules
are frozen dataclasses; the only state is ``VPSchedule``'s per-device lookup table, a pure function of its fields.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Schedule(Protocol):
    """What every schedule provides. ``τ`` is a float tensor of any shape (usually ``[b]``)."""

    kind: str

    def alpha(self, tau: Tensor) -> Tensor: ...
    def sigma(self, tau: Tensor) -> Tensor: ...
    def d_alpha(self, tau: Tensor) -> Tensor: ...
    def d_sigma(self, tau: Tensor) -> Tensor: ...
    def model_timestep(self, tau: Tensor) -> Tensor: ...
    def tau_from_model_timestep(self, t: Tensor) -> Tensor: ...
    def shift(self, tau: Tensor, num_tokens: int | None = None) -> Tensor: ...


def _f32(tau: Tensor | float) -> Tensor:
    return torch.as_tensor(tau, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# VP / DDPM (SD1.5, SDXL, digits teacher)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """Discrete VP schedule from a diffusers scheduler's ``alphas_cumprod``.

    The grid: training index ``n ∈ {0..N-1}`` sits at ``τ_n = (n + 1) / N`` and ``τ = 0`` is the clean level
    (``ᾱ = 1``), so ``τ = 1`` is index ``N-1`` and every diffusers timestep is exactly representable.
    Between grid points ``ᾱ`` is interpolated linearly in log-SNR; VP teachers are always fed the nearest integer
    index (``model_timestep`` rounds), as every public implementation does.
    """

    alphas_cumprod: Tensor  # [N], float64 copy of the diffusers buffer
    final_alpha_cumprod: float = 1.0  # diffusers DDIM's level after the last step (set_alpha_to_one)
    kind: str = field(default="vp", init=False)
    # device -> (ᾱ on the extended grid [N + 1], its log-SNR [N + 1]): built once per device, not on every call
    _tables: dict[torch.device, tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> VPSchedule:
        """Build from a diffusers scheduler instance or its config (any DDPM/DDIM/Euler/LCM/TCD scheduler)."""
        from diffusers import DDPMScheduler

        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        config = dict(config)
        if "snr_shift_scale" in config:
            return cls._from_snr_shifted(config)
        ddpm = DDPMScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
            trained_betas=config.get("trained_betas"),
            rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
        )
        acp = ddpm.alphas_cumprod.double()
        final = 1.0 if config.get("set_alpha_to_one", True) else float(acp[0])
        return cls(alphas_cumprod=acp, final_alpha_cumprod=final)

    @classmethod
    def _from_snr_shifted(cls, config: dict[str, Any]) -> VPSchedule:
        """CogVideoX's schedulers (``CogVideoXDDIMScheduler``, ``CogVideoXDPMScheduler``): the betas' ``ᾱ`` with the
        SNR divided by ``snr_shift_scale``, ``ᾱ' = ᾱ / (s + (1 − s)·ᾱ)``, then (``rescale_betas_zero_snr``) rescaled
        to zero terminal SNR; taken from the scheduler itself (float64, as its DDIM steps use it)."""
        from diffusers import CogVideoXDDIMScheduler

        accepted = inspect.signature(CogVideoXDDIMScheduler.__init__).parameters
        scheduler = CogVideoXDDIMScheduler.from_config({k: v for k, v in config.items() if k in accepted})
        acp = scheduler.alphas_cumprod.double()
        final = 1.0 if config.get("set_alpha_to_one", True) else float(acp[0])
        return cls(alphas_cumprod=acp, final_alpha_cumprod=final)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(ᾱ, log-SNR)`` on the extended grid (position 0 is the clean level, position n+1 is index n), float64
        on ``device``; computed there once (the same ops as a per-call rebuild, so the same bits)."""
        table = self._tables.get(device)
        if table is None:
            with torch.inference_mode(False), torch.no_grad():  # a plain constant, usable under and outside autograd
                acp = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).to(device)
                lsnr = torch.log(acp) - torch.log1p(-acp.clamp(max=1 - 1e-12))  # +inf at the clean level
            table = self._tables[device] = (acp, lsnr)
        return table

    def _acp(self, tau: Tensor) -> Tensor:
        tau = _f32(tau)
        acp, lsnr = self._table(tau.device)
        pos = (tau.double() * self.num_train_timesteps).clamp(0, self.num_train_timesteps)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        # Interpolate in log-SNR, except at the clean end where log-SNR is infinite.
        l_lo, l_hi = lsnr[lo], lsnr[lo + 1]
        inter = torch.sigmoid(l_lo + frac * (l_hi - l_lo))
        out = torch.where(frac == 0, acp[lo], torch.where(frac == 1, acp[lo + 1], inter))
        out = torch.where(lo == 0, acp[0] + frac * (acp[1] - acp[0]), out)  # clean→index 0: linear in ᾱ
        return out

    def alpha(self, tau: Tensor) -> Tensor:
        return self._acp(tau).sqrt().float()

    def sigma(self, tau: Tensor) -> Tensor:
        return (1 - self._acp(tau)).clamp(min=0).sqrt().float()

    def d_alpha(self, tau: Tensor) -> Tensor:
        return _finite_diff(self.alpha, tau)

    def d_sigma(self, tau: Tensor) -> Tensor:
        return _finite_diff(self.sigma, tau)

    def model_timestep(self, tau: Tensor) -> Tensor:
        return (_f32(tau) * self.num_train_timesteps - 1).round().clamp(0, self.num_train_timesteps - 1)

    def tau_from_model_timestep(self, t: Tensor) -> Tensor:
        return (_f32(t) + 1) / self.num_train_timesteps

    def shift(self, tau: Tensor, num_tokens: int | None = None) -> Tensor:
        return _f32(tau)

    def final_tau(self) -> float:
        """The level diffusers' DDIM ends on: 0 (clean) with ``set_alpha_to_one``, else index 0."""
        return 0.0 if self.final_alpha_cumprod == 1.0 else 1.0 / self.num_train_timesteps


def _finite_diff(fn: Any, tau: Tensor, h: float = 1e-3) -> Tensor:
    tau = _f32(tau)
    lo, hi = (tau - h).clamp(0, 1), (tau + h).clamp(0, 1)
    return (fn(hi) - fn(lo)) / (hi - lo)


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching / rectified flow (SD3, Flux, Wan, digits flow teacher)
# ---------------------------------------------------------------------------------------------------------------------


FLUX2_DEFAULT_STEPS = 50  # Flux2Pipeline's default num_inference_steps: the μ it shifts given sigmas= alone


def flux2_empirical_mu(num_tokens: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift ``μ`` (``Flux2Pipeline``'s ``compute_empirical_mu``): two fits
    linear in the token count, for 10 and for 200 sampling steps, interpolated linearly in the step count; above 4300
    tokens the 200-step fit alone."""
    at_200 = 0.00016927 * num_tokens + 0.45666666
    if num_tokens > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * num_tokens + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(slope * num_steps + (at_200 - 200.0 * slope))


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow ``x_s = (1 - s)·x0 + s·ε`` with ``τ = s``.

    ``timestep_scale`` is what multiplies ``s`` before the backbone sees it: 1000 for SD3/Wan, 1 for Flux.
    ``shift`` warps a sampling grid: static ``s' = k·s / (1 + (k - 1)·s)``; dynamic (Flux) uses
    ``k = e^μ`` with ``μ`` linear in the image token count between ``base_shift`` and ``max_shift``.
    ``empirical_mu`` (FLUX.2): ``μ`` from the token count and the step count instead (``flux2_empirical_mu``); without
    a step count, that of ``Flux2Pipeline``'s default ``num_inference_steps`` (what it uses when given ``sigmas=``).
    """

    timestep_scale: float = 1000.0
    shift_factor: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    empirical_mu: bool = False
    kind: str = field(default="flow", init=False)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any, timestep_scale: float = 1000.0) -> FlowSchedule:
        config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        return cls(
            timestep_scale=timestep_scale,
            shift_factor=float(config.get("shift", 1.0)),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            base_shift=float(config.get("base_shift", 0.5) or 0.5),
            max_shift=float(config.get("max_shift", 1.15) or 1.15),
            base_image_seq_len=int(config.get("base_image_seq_len", 256) or 256),
            max_image_seq_len=int(config.get("max_image_seq_len", 4096) or 4096),
        )

    def alpha(self, tau: Tensor) -> Tensor:
        return 1 - _f32(tau)

    def sigma(self, tau: Tensor) -> Tensor:
        return _f32(tau)

    def d_alpha(self, tau: Tensor) -> Tensor:
        return -torch.ones_like(_f32(tau))

    def d_sigma(self, tau: Tensor) -> Tensor:
        return torch.ones_like(_f32(tau))

    def model_timestep(self, tau: Tensor) -> Tensor:
        return _f32(tau) * self.timestep_scale

    def tau_from_model_timestep(self, t: Tensor) -> Tensor:
        return _f32(t) / self.timestep_scale

    def mu(self, num_tokens: int, num_steps: int | None = None) -> float:
        """Flux's ``calculate_shift``: μ linear in the token count; FLUX.2's (``empirical_mu``) also reads the step
        count (default ``FLUX2_DEFAULT_STEPS``)."""
        if self.empirical_mu:
            return flux2_empirical_mu(num_tokens, num_steps or FLUX2_DEFAULT_STEPS)
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return num_tokens * m + (self.base_shift - m * self.base_image_seq_len)

    def shift(self, tau: Tensor, num_tokens: int | None = None, num_steps: int | None = None) -> Tensor:
        """The shifted levels of ``tau``; a dynamic shift reads ``num_tokens`` (and FLUX.2's ``num_steps``)."""
        tau = _f32(tau)
        if self.use_dynamic_shifting:
            if num_tokens is None:
                raise ValueError("This flow schedule uses dynamic shifting: pass num_tokens (image tokens).")
            k = math.exp(self.mu(num_tokens, num_steps))
        else:
            k = self.shift_factor
        return k * tau / (1 + (k - 1) * tau)


# ---------------------------------------------------------------------------------------------------------------------
# TrigFlow (sCM, rCM) and EDM / VE
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrigFlowSchedule:
    """TrigFlow ``x_u = cos(u)·x0 + sin(u)·z`` with ``u = τ·π/2`` and σ_d = 1.

    ``model_timestep`` is ``timestep_scale·u`` unless ``rf_timestep`` is set, in which case the backbone is an RF
    model fed ``timestep_scale·s`` with ``s = sin u / (cos u + sin u)`` (rCM's wrapper).
    """

    timestep_scale: float = 1000.0
    rf_timestep: bool = False
    kind: str = field(default="trigflow", init=False)

    def alpha(self, tau: Tensor) -> Tensor:
        return torch.cos(_f32(tau) * (math.pi / 2))

    def sigma(self, tau: Tensor) -> Tensor:
        return torch.sin(_f32(tau) * (math.pi / 2))

    def d_alpha(self, tau: Tensor) -> Tensor:
        return -(math.pi / 2) * torch.sin(_f32(tau) * (math.pi / 2))

    def d_sigma(self, tau: Tensor) -> Tensor:
        return (math.pi / 2) * torch.cos(_f32(tau) * (math.pi / 2))

    def model_timestep(self, tau: Tensor) -> Tensor:
        u = _f32(tau) * (math.pi / 2)
        if self.rf_timestep:
            return self.timestep_scale * torch.sin(u) / (torch.cos(u) + torch.sin(u))
        return self.timestep_scale * u

    def tau_from_model_timestep(self, t: Tensor) -> Tensor:
        t = _f32(t) / self.timestep_scale
        if self.rf_timestep:  # s = tan u / (1 + tan u)  ⇒  u = arctan(s / (1 - s))
            return torch.atan2(t, 1 - t) / (math.pi / 2)
        return t / (math.pi / 2)

    def shift(self, tau: Tensor, num_tokens: int | None = None) -> Tensor:
        return _f32(tau)


@dataclass(frozen=True)
class EDMSchedule:
    """EDM / VE ``x = x0 + σ·ε`` with ``σ = tan(τ·π/2)``: equal SNR to TrigFlow at the same τ.

    ``model_timestep`` is EDM's ``c_noise = ¼·ln σ``. ``sigma_max`` clips τ = 1 to a finite noise level.
    """

    sigma_max: float = 80.0
    kind: str = field(default="edm", init=False)

    def _s(self, tau: Tensor) -> Tensor:
        tau_max = math.atan(self.sigma_max) / (math.pi / 2)  # clip before tan: tan(π/2) overflows to -2e7 in fp32
        return torch.tan(_f32(tau).clamp(0, tau_max) * (math.pi / 2))

    def alpha(self, tau: Tensor) -> Tensor:
        return torch.ones_like(_f32(tau))

    def sigma(self, tau: Tensor) -> Tensor:
        return self._s(tau)

    def d_alpha(self, tau: Tensor) -> Tensor:
        return torch.zeros_like(_f32(tau))

    def d_sigma(self, tau: Tensor) -> Tensor:
        return (math.pi / 2) / torch.cos(_f32(tau) * (math.pi / 2)).clamp(min=1 / self.sigma_max) ** 2

    def model_timestep(self, tau: Tensor) -> Tensor:
        return 0.25 * torch.log(self._s(tau).clamp(min=1e-20))

    def tau_from_model_timestep(self, t: Tensor) -> Tensor:
        return torch.atan(torch.exp(4 * _f32(t))) / (math.pi / 2)

    def shift(self, tau: Tensor, num_tokens: int | None = None) -> Tensor:
        return _f32(tau)


def schedule_from_diffusers(scheduler_or_config: Any, timestep_scale: float = 1000.0) -> Schedule:
    """Pick the schedule family from a diffusers scheduler (or its config dict)."""
    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    cls_name = config.get("_class_name", type(scheduler_or_config).__name__)
    if "FlowMatch" in cls_name or "shift" in config and "beta_schedule" not in config:
        return FlowSchedule.from_diffusers(config, timestep_scale=timestep_scale)
    if "beta_schedule" in config or "trained_betas" in config:
        return VPSchedule.from_diffusers(config)
    raise ValueError(
        f"Scheduler {cls_name!r} is not supported: expected a VP scheduler (DDPM/DDIM/Euler/LCM/TCD, with "
        "`beta_schedule`) or a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)."
    )
