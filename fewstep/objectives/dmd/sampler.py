"""Sampling and export of DMD students (ALGORITHMS §2.6): predict x̂0 at each student level, re-noise to the next
with fresh noise, return the last x̂0; no CFG at inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.schedules import Schedule
from fewstep.objectives.dmd.functional import student_taus
from fewstep.objectives.spec import SamplingSpec, flow_renoise_spec, lcm_vp_spec
from fewstep.solvers.samplers import sample_consistency


def num_tokens_of(teacher_or_family: Any, shape: tuple[int, ...]) -> int | None:
    """Image tokens of a latent ``[b, c, h, w]`` for dynamically shifted flow teachers (Flux packs 2×2), else None."""
    schedule = getattr(teacher_or_family, "schedule", None)
    if schedule is None or not getattr(schedule, "use_dynamic_shifting", False) or len(shape) != 4:
        return None
    return (shape[2] // 2) * (shape[3] // 2)


@dataclass
class DMDSampler:
    """``sampler(noise, cond, num_steps, generator) -> x0`` on the student grid ``student_taus(num_steps)``."""

    denoiser: Denoiser
    schedule: Schedule
    family: str = "custom"

    def timesteps(self, num_steps: int, shape: tuple[int, ...] = ()) -> Tensor:
        return student_taus(self.schedule, num_steps, num_tokens_of(self, shape))

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = self.timesteps(num_steps, tuple(noise.shape)).to(noise.device)
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                predict = lambda x, tau: self.denoiser(x, tau, cond.to(x.device))  # noqa: E731
                return sample_consistency(predict, self.schedule, noise, taus, generator)
        finally:
            self.denoiser.train(was_training)


def dmd_sampling_spec(
    teacher: Teacher, objective: str, steps: tuple[int, ...], trained_steps: int, note: str
) -> SamplingSpec:
    """A ``SamplingSpec`` for a DMD student: ``LCMScheduler`` (VP; with ``original_inference_steps = N`` its
    ``set_timesteps(K)`` picks ``999 − i·⌊N/K⌋``, exactly the student grid, and its boundary blend is ~1e-7 there)
    or ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` with ``sigmas = 1 − i/K`` (flow)."""
    schedule = teacher.schedule
    common = dict(
        objective=objective, recommended_steps=trained_steps, guidance_scale=1.0,
        guidance_convention=f"{GUIDANCE_CONVENTION}; {note}",
    )  # fmt: skip
    if schedule.kind == "vp":
        n = schedule.num_train_timesteps
        timesteps = {s: schedule.model_timestep(student_taus(schedule, s)).long().tolist() for s in steps}
        return lcm_vp_spec(teacher, timesteps, n, 10.0, **common)
    sigmas = {s: (1.0 - torch.arange(s, dtype=torch.float32) / s).tolist() for s in steps}
    if schedule.use_dynamic_shifting:  # the pipeline shifts by resolution; levels shown before the shift
        levels = sigmas
    else:
        levels = {s: student_taus(schedule, s).tolist() for s in steps}
    return flow_renoise_spec(teacher, sigmas, levels, 0.0, **common)
