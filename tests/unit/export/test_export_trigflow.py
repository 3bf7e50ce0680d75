"""Continuous-time students (sCM here; rCM and TBCM share the sampler and its export) on flow teachers whose pipelines
shift by resolution (Flux, Qwen-Image). The student's levels are TrigFlow angles that do not depend on the resolution,
so the export carries a scheduler without any shift and the trained levels as ``sigmas``: the stock pipeline (which
computes its ``mu`` from the image size) then runs exactly at the trained levels, and reproduces the one-step student.
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.scm import SCM, SCMConfig
from tests.helpers import TOLERANCE, move_lora_away, single_thread  # noqa: F401 (fixture)
from tests.unit.export.test_export_flux import stock_flux_latents
from tests.unit.export.test_export_qwen_image import stock_qwen_latents


def stock_latents(family: str, pipe, spec, cond, noise: torch.Tensor, num_steps: int, callback=None) -> torch.Tensor:
    extra = {"callback_on_step_end": callback} if callback is not None else {}
    if family == "flux":
        kwargs = {k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"}
        return stock_flux_latents(pipe, cond, noise, spec.guidance_scale, **kwargs, **extra)
    return stock_qwen_latents(pipe, spec, cond, noise, num_steps, 1, **extra)


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_stock_pipeline_runs_the_trained_levels_and_reproduces_the_one_step_student(family, tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    assert teacher.schedule.use_dynamic_shifting
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=1.0, mid_u=[1.1]), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift"] == 1.0
    levels = spec.steps[2]["levels"]
    u = torch.tensor(1.1)
    assert spec.steps[2]["sigmas"] == levels and abs(levels[1] - float(u.sin() / (u.sin() + u.cos()))) < 1e-6

    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    cond, _ = encode_prompts(teacher, ["a red circle", "a blue square"])
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))

    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_latents(family, pipe, spec, cond, noise, 1)
    diff = float((theirs - ours).abs().max())
    print(f"{family} sCM LoRA, 1 step: max |stock − fewstep| = {diff:.2e}")
    assert ours.abs().max() > 0.1 and diff < TOLERANCE

    seen = []  # the levels the stock pipeline really runs at 2 steps (its mu is computed from the image size)

    def record(pipeline, i, t, kwargs):
        seen.append(pipeline.scheduler.sigmas.clone())
        return kwargs

    stock_latents(family, pipe, spec, cond, noise, 2, callback=record)
    assert torch.allclose(seen[0][:2], torch.tensor(levels), atol=1e-6), (seen[0], levels)
    teacher_scheduler = type(pipe.scheduler).from_config(teacher.pipeline.scheduler.config)
    teacher_scheduler.set_timesteps(sigmas=levels, mu=1.0)  # what the teacher's own scheduler would make of them
    assert (teacher_scheduler.sigmas[1] - levels[1]).abs() > 1e-3, "a shifting scheduler would have moved them"
