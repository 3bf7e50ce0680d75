"""Sampling and export of DMD students: predict x̂0 at each student level, re-noise to the next
with fresh noise, return the last x̂0; no CFG at inference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.schedules import Schedule
from fewstep.objectives.spec import SamplingSpec, flow_renoise_spec, lcm_vp_spec
from fewstep.solvers.grids import dmd_student_taus
from fewstep.solvers.samplers import sample_consistency


@dataclass
class DMDSampler:
    """``sampler(noise, cond, num_steps, generator) -> x0`` on the student grid ``dmd_student_taus(num_steps)``."""

    denoiser: Denoiser
    schedule: Schedule
    family: str = "custom"

    def timesteps(self, num_steps: int, shape: tuple[int, ...] = ()) -> Tensor:
        return dmd_student_taus(self.schedule, num_steps, num_tokens(self.denoiser, shape))

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
        timesteps = {s: schedule.model_timestep(dmd_student_taus(schedule, s)).long().tolist() for s in steps}
        return lcm_vp_spec(teacher, timesteps, n, 10.0, **common)
    sigmas = {s: (1.0 - torch.arange(s, dtype=torch.float32) / s).tolist() for s in steps}
    if schedule.use_dynamic_shifting:  # the pipeline shifts by resolution; levels shown before the shift
        levels = sigmas
    else:
        levels = {s: dmd_student_taus(schedule, s).tolist() for s in steps}
    return flow_renoise_spec(teacher, sigmas, levels, 0.0, **common)
