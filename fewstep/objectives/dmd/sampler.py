"""Sampling and export of DMD students: predict x̂0 at each student level, re-noise to the next
with fresh noise, return the last x̂0; no CFG at inference.

The student's levels have one home, ``dmd_student_grid``: DMD2's grid (``dmd_student_taus``), or, for a pipeline that
cannot be given the levels (``WanPipeline``, ``LTXPipeline``: no ``sigmas=``), the grid that pipeline runs with the
exported scheduler (``dmd_pipeline_scheduler``), float32 as the pipeline computes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.models.backbones import num_tokens, renoise_layout
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.schedules import Schedule
from fewstep.objectives.pipeline_grid import pipeline_grid_spec, pipeline_levels, scheduler_through, takes_sigmas
from fewstep.objectives.spec import SamplingSpec, flow_renoise_spec, flow_scheduler_config, lcm_vp_spec
from fewstep.solvers.grids import dmd_student_taus
from fewstep.solvers.samplers import sample_consistency


def dmd_pipeline_scheduler(teacher: Teacher, trained_steps: int) -> dict[str, Any] | None:
    """The exported ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` config of a DMD student whose
    pipeline takes no ``sigmas=``; ``None`` where the pipeline takes them (the student keeps ``dmd_student_taus``).

    Static shift (Wan): ``shift`` and ``shift_terminal`` solved so that ``set_timesteps(trained_steps)`` is DMD's
    ``shift(1 − i/K)`` grid on the teacher's shift (``scheduler_through``), at every resolution. Dynamic shift (LTX):
    the teacher's config as it is, since ``LTXPipeline`` passes ``linspace(1, 1/K, K)`` itself, shifted by the
    video's token count: DMD's grid at that resolution.
    """
    if teacher.schedule.kind != "flow" or takes_sigmas(teacher.pipeline):
        return None
    config = flow_scheduler_config(teacher, stochastic_sampling=True)
    if config.get("use_dynamic_shifting"):
        return config
    with torch.device("cpu"):  # plain numbers wherever the models live (`fewstep plan` builds them on meta)
        return scheduler_through(config, dmd_student_taus(teacher.schedule, trained_steps))


def dmd_student_grid(
    schedule: Schedule, num_steps: int, num_tokens: int | None = None, pipeline_scheduler: dict[str, Any] | None = None
) -> Tensor:
    """The ``num_steps`` input levels of a DMD student: ``pipeline_levels`` of ``pipeline_scheduler`` (a sigma-less
    pipeline's exported scheduler, ``dmd_pipeline_scheduler``) where it can run ``num_steps`` steps, else
    ``dmd_student_taus`` (one step: σ = 1 either way)."""
    if pipeline_scheduler is not None:
        levels = pipeline_levels(pipeline_scheduler, schedule, num_steps, num_tokens)
        if levels is not None:
            return levels
    return dmd_student_taus(schedule, num_steps, num_tokens)


@dataclass
class DMDSampler:
    """``sampler(noise, cond, num_steps, generator) -> x0`` on the student grid ``dmd_student_grid(num_steps)``."""

    denoiser: Denoiser
    schedule: Schedule
    family: str = "custom"
    pipeline_scheduler: dict[str, Any] | None = None  # a sigma-less pipeline's exported scheduler config

    def timesteps(self, num_steps: int, shape: tuple[int, ...] = ()) -> Tensor:
        ntok = num_tokens(self.denoiser, shape)
        return dmd_student_grid(self.schedule, num_steps, ntok, self.pipeline_scheduler)

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = self.timesteps(num_steps, tuple(noise.shape)).to(noise.device)
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                predict = lambda x, tau: self.denoiser(x, tau, cond.to(x.device))  # noqa: E731
                layout = renoise_layout(self.denoiser)  # CogVideoX's scheduler draws frames first
                return sample_consistency(predict, self.schedule, noise, taus, generator, layout)
        finally:
            self.denoiser.train(was_training)


def dmd_sampling_spec(
    teacher: Teacher, objective: str, steps: tuple[int, ...], trained_steps: int, note: str
) -> SamplingSpec:
    """A ``SamplingSpec`` for a DMD student: ``LCMScheduler`` (VP; with ``original_inference_steps = N`` its
    ``set_timesteps(K)`` picks ``999 − i·⌊N/K⌋``, exactly the student grid, and its boundary blend is ~1e-7 there),
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` with ``sigmas = 1 − i/K`` (flow), or, for a pipeline
    that takes no ``sigmas=``, that scheduler solved so that ``num_inference_steps=K`` gives the trained grid
    (``dmd_pipeline_scheduler``)."""
    schedule = teacher.schedule
    pipeline_scheduler = dmd_pipeline_scheduler(teacher, trained_steps)
    if pipeline_scheduler is not None:
        return pipeline_grid_spec(pipeline_scheduler, schedule, steps, trained_steps, objective, note)
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
