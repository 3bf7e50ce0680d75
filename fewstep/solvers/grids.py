"""Every sampling grid: the τ levels a solver steps through, as pure functions of a schedule and a step count.

Levels are float32 τ ∈ [0, 1] (τ = 1 is noise). Teacher-side grids hold ``num_steps + 1`` levels (the boundaries
of each step, from the first input level to the final level); student grids hold the ``num_steps`` input levels.

* ``linspace_grid`` / ``trailing_vp_grid``: uniform levels; diffusers' ``timestep_spacing="trailing"`` on a VP
  teacher's integer timesteps.
* ``teacher_taus``: a teacher's default deterministic grid (VP trailing, otherwise uniform through the schedule's
  shift); ``sampling_taus``: the same levels kept off τ = 1 for networks that divide by α there.
* ``dmd_student_taus``: a few-step DMD student's input levels; ``skipping_grid``, ``lcm_timesteps`` and
  ``segment_edges``: LCM's skipping-step grid and the levels ``LCMScheduler`` / ``TCDScheduler`` pick from it.
* ``scheduler_taus``: the levels a diffusers scheduler's own ``set_timesteps`` produces (pipeline parity).

A dynamically shifted flow schedule (Flux) needs ``num_tokens``, the image token count of the latent; the backbone
adapter knows it (``fewstep.models.backbones.num_tokens``).

``scheduler_taus(scheduler, schedule, num_inference_steps)`` returns the ``num_inference_steps + 1`` levels
``τ_0 > τ_1 > … > τ_N`` such that ``sample_ddim`` over them (DDIM η=0 / flow Euler) takes the same steps as the
scheduler inside its pipeline. It calls the scheduler's own ``set_timesteps`` on a copy, then converts:

* ``DDIMScheduler``: timesteps ``t`` → ``τ = (t + 1) / N_train``; the last step goes to ``t - N_train // steps``
  or, below 0, to the final level (clean with ``set_alpha_to_one``, index 0 without it). ``CogVideoXDDIMScheduler``
  steps alike, on its SNR-shifted ``ᾱ`` (``VPSchedule.from_diffusers``).
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
from fewstep.noise.timesteps import TAU_EPS

SUPPORTED = ("DDIMScheduler", "CogVideoXDDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


# ---------------------------------------------------------------------------------------------------------------------
# Uniform and teacher grids
# ---------------------------------------------------------------------------------------------------------------------


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


def teacher_taus(schedule: Schedule, num_steps: int, num_tokens: int | None = None, offset: float = 0.0) -> Tensor:
    """A teacher's default deterministic grid: ``num_steps + 1`` levels, descending from pure noise to clean.

    VP: ``trailing`` spacing on the integer timesteps (first step at index N-1, as DDIM with
    ``timestep_spacing="trailing"``). Other schedules: uniform from 1 to 0 through the schedule's own shift (as
    ``FlowMatchEulerDiscreteScheduler`` with ``sigmas``); a dynamically shifted one (Flux) reads ``num_tokens``.

    Args:
        schedule: the teacher's schedule.
        num_steps: solver steps.
        num_tokens: image tokens of the latent (``fewstep.models.backbones.num_tokens``); only Flux uses it.
        offset: in ``[-1/2, 1/2)``, moves the interior levels toward the clean end by that fraction of a step (VP:
            to the nearest training index); the first and the last level stay.

    Returns:
        float32 ``[num_steps + 1]``.
    """
    if schedule.kind == "vp":
        return trailing_vp_grid(num_steps, schedule.num_train_timesteps, offset)
    if schedule.kind == "flow":  # FLUX.2's shift also reads the step count
        return schedule.shift(linspace_grid(num_steps, offset=offset), num_tokens, num_steps)
    return schedule.shift(linspace_grid(num_steps, offset=offset), num_tokens)


def sampling_taus(schedule: Schedule, num_steps: int, num_tokens: int | None = None, offset: float = 0.0) -> Tensor:
    """``teacher_taus`` with continuous levels clamped to ``[0, 1 − TAU_EPS]``: the grid of the deterministic student
    and pair samplers, which may feed networks whose conversion divides by ``α`` (zero at τ = 1 for flow).

    VP levels are integer timesteps and are never clamped. Returns float32 ``[num_steps + 1]``.
    """
    taus = teacher_taus(schedule, num_steps, num_tokens, offset)
    if schedule.kind == "vp":
        return taus
    return taus.clamp(0, 1 - TAU_EPS)


# ---------------------------------------------------------------------------------------------------------------------
# Few-step student grids
# ---------------------------------------------------------------------------------------------------------------------


def dmd_student_taus(schedule: Schedule, num_steps: int, num_tokens: int | None = None) -> Tensor:
    """The ``num_steps`` input levels of a few-step DMD student, descending from pure noise.

    VP: the integer timesteps ``999 − i·⌊1000/K⌋`` (DMD2's SDXL 4-step grid ``[999, 749, 499, 249]``); flow:
    ``shift(1 − i/K)`` (uniform before the teacher's shift, as ``FlowMatchEulerDiscreteScheduler`` with sigmas).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    if schedule.kind == "vp":
        n = schedule.num_train_timesteps
        t = (n - 1) - torch.arange(num_steps) * (n // num_steps)
        return schedule.tau_from_model_timestep(t)
    if schedule.kind == "flow":
        return schedule.shift(1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps, num_tokens)
    raise ValueError(f"DMD student grids are defined for VP and flow schedules, not {schedule.kind!r}.")


def skipping_grid(schedule: Schedule, num_ddim_timesteps: int, num_tokens: int | None = None) -> Tensor:
    """The LCM skipping-step grid as ``num_ddim_timesteps + 1`` ascending τ levels.

    Interval ``i`` runs from ``grid[i + 1]`` (= ``t_{n+k}``) down to ``grid[i]`` (= ``t_n``). VP: the diffusers DDIM
    solver grid on the teacher's integer timesteps, ``t = (i+1)·k − 1`` with ``k = N_train // num_ddim_timesteps``
    and ``t_n = max(t_{n+k} − k, 0)``; flow: the same number of intervals, uniform before the shift (a dynamic one
    reads ``num_tokens``, the latents' token count, as the pipeline does).
    """
    n = num_ddim_timesteps
    if schedule.kind == "vp":
        n_train = schedule.num_train_timesteps
        if n > n_train:
            raise ValueError(f"num_ddim_timesteps={n} exceeds the teacher's {n_train} training timesteps.")
        k = n_train // n  # skipping step (LCMScheduler / DDIMSolver)
        idx = torch.arange(1, n + 1) * k - 1  # 19, 39, ..., 999 for n = 50
        idx = torch.cat([torch.zeros(1, dtype=idx.dtype), idx])  # t_n = max(t_{n+k} − k, 0)
        return schedule.tau_from_model_timestep(idx)
    return schedule.shift(torch.arange(n + 1, dtype=torch.float32) / n, num_tokens)


def segment_edges(num_intervals: int, segments: int, starts: bool) -> Tensor:
    """Segment boundaries as indices of the ``num_intervals + 1``-level skipping grid.

    Segment ``j`` starts at grid index ``N − floor(j·N/M)`` (``j = 0..M−1``): the levels ``TCDScheduler`` (and
    ``LCMScheduler``) pick for ``M`` steps from the same grid, so the segments nest (8 ⊃ 4 ⊃ 2 ⊃ 1).

    Args:
        num_intervals: ``N``; segments: ``M``.
        starts: ``True``: the ``M`` segment starts, descending; ``False``: the ``M`` lower edges, ascending
            (``0`` and the starts of the lower segments).
    """
    n, m = num_intervals, segments
    first = n - torch.floor(torch.arange(m, dtype=torch.float64) * (n / m)).long()  # n, ..., descending
    if starts:
        return first
    return torch.cat([torch.zeros(1, dtype=torch.long), first[1:].flip(0)])


def lcm_timesteps(grid: Tensor, num_steps: int) -> Tensor:
    """Pick ``num_steps`` sampling levels from the skipping grid as ``LCMScheduler.set_timesteps`` does.

    The grid's upper ends ``grid[1:]`` reversed (999, 979, ... for VP) are indexed at
    ``floor(linspace(0, N, num_steps, endpoint=False))``. Returns ``[num_steps]`` descending τ.
    """
    origin = grid[1:].flip(0)
    n = origin.shape[0]
    if not 1 <= num_steps <= n:
        raise ValueError(
            f"num_steps={num_steps} is not in [1, {n}]: the LCM sampler picks levels from the "
            f"{n}-interval skipping grid it was trained on (objective.num_ddim_timesteps)."
        )
    idx = torch.floor(torch.arange(num_steps, dtype=torch.float64) * (n / num_steps)).long()
    return origin[idx]


# ---------------------------------------------------------------------------------------------------------------------
# Grids of diffusers schedulers
# ---------------------------------------------------------------------------------------------------------------------


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
    if name in ("DDIMScheduler", "CogVideoXDDIMScheduler"):  # CogVideoX's DDIM steps as DDIM does, on its own ᾱ
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
        kwargs["mu"] = schedule.mu(num_tokens, num_inference_steps)  # FLUX.2's μ reads the step count too
        if sigmas is None:  # FluxPipeline passes these explicitly
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **kwargs)
    return scheduler.sigmas.float().clone()
