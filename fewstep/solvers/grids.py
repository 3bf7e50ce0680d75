"""τ grids that reproduce a diffusers scheduler's own timesteps (the teacher side of pipeline parity).

``scheduler_taus(scheduler, schedule, num_inference_steps)`` returns the ``num_inference_steps + 1`` levels
``τ_0 > τ_1 > … > τ_N`` such that ``sample_ddim`` over them (DDIM η=0 / flow Euler) takes the same steps as the
scheduler inside its pipeline. It calls the scheduler's own ``set_timesteps`` on a copy, then converts:

* ``DDIMScheduler``: timesteps ``t`` → ``τ = (t + 1) / N_train``; the last step goes to ``t - N_train // steps``
  or, below 0, to the final level (clean with ``set_alpha_to_one``, index 0 without it).
* ``EulerDiscreteScheduler`` (SDXL's default): Euler in σ = √((1-ᾱ)/ᾱ) is DDIM in the VP variable, so the levels
  are those of its integer timesteps, then τ = 0 (σ = 0). Its initial latents are scaled by ``init_noise_sigma``;
  divide them by √(σ_0² + 1) (``vp_input_scale``) to get the VP state the teacher starts from.
* ``FlowMatchEulerDiscreteScheduler``: ``τ = s`` are its (shifted) sigmas, including the final 0. Dynamic shifting
  (Flux) needs ``num_tokens`` for ``μ``; without explicit ``sigmas`` the Flux pipeline's ``linspace(1, 1/n, n)`` is
  used for dynamically shifted schedulers, the scheduler's default otherwise (SD3), as each pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.noise.schedules import FlowSchedule, Schedule, VPSchedule

SUPPORTED = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def _copy(scheduler: Any) -> Any:
    """A fresh scheduler with the same config (``set_timesteps`` mutates its scheduler)."""
    return type(scheduler).from_config(scheduler.config)


def scheduler_taus(
    scheduler: Any,
    schedule: Schedule,
    num_inference_steps: int,
    num_tokens: int | None = None,
    sigmas: Sequence[float] | None = None,
    strict: bool = True,
) -> Tensor:
    """The ``num_inference_steps + 1`` τ levels a diffusers scheduler steps through.

    Args:
        scheduler: a diffusers scheduler (instance); it is not modified.
        schedule: the teacher's schedule (``VPSchedule`` for DDIM/Euler, ``FlowSchedule`` for flow matching).
        num_inference_steps: the number of denoising steps.
        num_tokens: image tokens (Flux: ``(h/2)·(w/2)`` of the latent) for dynamic shifting.
        sigmas: explicit flow sigmas passed to ``set_timesteps`` (as ``FluxPipeline`` does).
        strict: DDIM steps to ``t - N_train // steps``; when that is not the next timestep (``linspace`` spacing,
            or a step count that does not divide ``N_train``), raise instead of following the timesteps.

    Returns:
        float32 ``[num_inference_steps + 1]``, decreasing, from the first input level to the final level.
    """
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return _ddim_taus(_copy(scheduler), _vp(schedule, name), num_inference_steps, strict)
    if name == "EulerDiscreteScheduler":
        return _euler_taus(_copy(scheduler), _vp(schedule, name), num_inference_steps)
    if name == "FlowMatchEulerDiscreteScheduler":
        return _flow_taus(_copy(scheduler), schedule, num_inference_steps, num_tokens, sigmas)
    raise ValueError(f"No τ grid for {name}; supported: {', '.join(SUPPORTED)}.")


def _vp(schedule: Schedule, name: str) -> VPSchedule:
    if not isinstance(schedule, VPSchedule):
        raise ValueError(f"{name} is a VP scheduler but the schedule is {type(schedule).__name__}; pass a VPSchedule.")
    return schedule


def _ddim_taus(scheduler: Any, schedule: VPSchedule, num_inference_steps: int, strict: bool) -> Tensor:
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    n_train = scheduler.config.num_train_timesteps
    step = n_train // num_inference_steps
    prevs = [t - step for t in timesteps]  # DDIM's prev_timestep (scheduling_ddim.step)
    if strict and prevs[:-1] != timesteps[1:]:
        raise ValueError(
            f"DDIM with timestep_spacing={scheduler.config.timestep_spacing!r} and {num_inference_steps} steps steps "
            f"from each t to t - {step} ({prevs[:-1]}), which is not the next timestep ({timesteps[1:]}), so no "
            "single τ grid reproduces it. Use 'leading' or 'trailing' spacing with a step count dividing "
            f"{n_train}, or strict=False to follow the timesteps."
        )
    taus = schedule.tau_from_model_timestep(torch.tensor(timesteps, dtype=torch.float32))
    final = (prevs[-1] + 1) / n_train if prevs[-1] >= 0 else _final_level(scheduler, n_train)
    return torch.cat([taus, torch.tensor([final], dtype=torch.float32)])


def _final_level(scheduler: Any, n_train: int) -> float:
    """DDIM's level after its last step: ``final_alpha_cumprod`` = 1 (clean) or ``ᾱ_0`` (index 0)."""
    return 0.0 if scheduler.config.set_alpha_to_one else 1.0 / n_train


def _euler_taus(scheduler: Any, schedule: VPSchedule, num_inference_steps: int) -> Tensor:
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps.double()
    sigmas = scheduler.sigmas.double()
    acp = schedule.alphas_cumprod.double()
    idx = timesteps.round().long()
    expected = ((1 - acp[idx]) / acp[idx]).sqrt()
    if not torch.allclose(timesteps, idx.double()) or not torch.allclose(sigmas[:-1], expected, rtol=1e-5):
        raise ValueError(
            "EulerDiscreteScheduler sigmas are not those of integer timesteps (Karras/exponential sigmas or "
            "'linspace' spacing); only 'leading'/'trailing' spacing with plain sigmas maps onto a VP grid."
        )
    if float(sigmas[-1]) != 0.0:
        raise ValueError("EulerDiscreteScheduler must end at sigma 0 (final_sigmas_type='zero').")
    taus = schedule.tau_from_model_timestep(idx.float())
    return torch.cat([taus, torch.zeros(1)])


def vp_input_scale(scheduler: Any, num_inference_steps: int) -> float:
    """``1 / √(σ_0² + 1)``: the factor from an Euler pipeline's initial latents (VE-scaled) to the VP state.

    DDIM-type schedulers (``init_noise_sigma = 1``) return 1.
    """
    if type(scheduler).__name__ != "EulerDiscreteScheduler":
        return 1.0
    s = _copy(scheduler)
    s.set_timesteps(num_inference_steps)
    return float(1 / (s.sigmas[0].double() ** 2 + 1).sqrt())


def _flow_taus(
    scheduler: Any,
    schedule: Schedule,
    num_inference_steps: int,
    num_tokens: int | None,
    sigmas: Sequence[float] | None,
) -> Tensor:
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"FlowMatchEulerDiscreteScheduler needs a FlowSchedule, got {type(schedule).__name__}.")
    kwargs: dict[str, Any] = {}
    if scheduler.config.use_dynamic_shifting:
        if num_tokens is None:
            raise ValueError("This scheduler shifts with the resolution: pass num_tokens (Flux: (h/2)·(w/2) latent).")
        kwargs["mu"] = schedule.mu(num_tokens)
        if sigmas is None:  # FluxPipeline passes these explicitly
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **kwargs)
    return scheduler.sigmas.float().clone()
