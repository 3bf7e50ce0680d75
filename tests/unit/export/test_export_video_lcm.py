"""LCM-LoRA students of the video pipelines that take no ``sigmas=`` (Wan 2.1, LTX-Video), trained a few steps from
the shipped recipes' objective blocks on the tiny models and exported as a LoRA with a
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``.

Wan: the exported scheduler's own 4-step grid is LCM's 4-step pick from the skipping grid, and the stock
``WanPipeline`` reproduces the student draw for draw at 2, 4 and 8 steps (and at one step with the scheduler loaded
with ``shift_terminal=None``). LTX: the skipping grid is shifted by the batch's token count as ``LTXPipeline`` shifts
its levels, so its 1, 2, 4 and 8-step levels are all on the trained grid; the stock pipeline reproduces the one-step
student and runs the student's levels at every step count."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch

from fewstep.config import load_recipe
from fewstep.export import export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.lcm import LCM, LCMConfig
from fewstep.solvers.grids import lcm_timesteps
from tests.helpers import TOLERANCE, single_thread, train_at_phases  # noqa: F401 (fixture)
from tests.unit.export.test_export_ltx import stock_ltx_latents
from tests.unit.export.test_export_video_trigflow import PROMPTS, with_student
from tests.unit.export.test_export_wan import stock_wan_latents

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "lcm"


def lcm_student_of(recipe: str, family: str):
    """A tiny LoRA student with ``recipe``'s objective block, trained 3 steps."""
    block = load_recipe(RECIPES / f"{recipe}.yaml").objective
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    objective = LCM(LCMConfig(**block.model_dump()), teacher, Student.lora(teacher, rank=4, alpha=8))
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    train_at_phases(objective, cond, uncond, shape)
    return teacher, objective, cond, shape


def test_stock_wan_pipeline_reproduces_the_lcm_student(tmp_path):
    teacher, objective, cond, shape = lcm_student_of("wan21_lcm_lora", "wan21")
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.objective == "lcm" and spec.scheduler_config["stochastic_sampling"]
    assert spec.recommended_steps == 4 and spec.guidance_scale == 1.0
    assert spec.call_kwargs(4) == {"guidance_scale": 1.0, "num_inference_steps": 4}
    trained = lcm_timesteps(objective.grid, 4)  # LCMScheduler's 4-step pick from the 48-interval grid
    assert torch.allclose(torch.tensor(spec.steps[4]["levels"]), trained, atol=1e-6), spec.steps[4]
    assert torch.allclose(trained, teacher.schedule.shift(1 - torch.arange(4) / 4), atol=1e-6)

    pipe = with_student(diffusers.WanPipeline, teacher, out)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    for steps in (2, 4, 8):
        levels = objective.sampler().timesteps(steps, shape)
        assert torch.allclose(levels, torch.tensor(spec.steps[steps]["levels"]), atol=1e-6)
        ours = objective.sampler()(noise, cond, steps, torch.Generator().manual_seed(steps))
        theirs = stock_wan_latents(pipe, cond, noise, spec.guidance_scale, steps=steps, seed=steps)
        print(f"wan21_lcm_lora, {steps} steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
        assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
        assert (theirs - ours).abs().max() < TOLERANCE

    one = with_student(diffusers.WanPipeline, teacher, out, shift_terminal=None)  # σ = 1: the student's one step
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    assert (stock_wan_latents(one, cond, noise, spec.guidance_scale) - ours).abs().max() < TOLERANCE
    one.unload_lora_weights()  # without the trained LoRA the stock pipeline is the teacher, not the student
    assert (stock_wan_latents(one, cond, noise, spec.guidance_scale) - ours).abs().max() > 100 * TOLERANCE


def test_ltx_lcm_grid_follows_the_token_count_and_the_stock_pipeline_runs_it(tmp_path):
    teacher, objective, cond, shape = lcm_student_of("ltx_lcm_lora", "ltx")
    assert objective.grid is None  # dynamic shift: one grid per token count
    grid = objective.grid_for(shape)
    wider = objective.grid_for((*shape[:-1], 2 * shape[-1]))
    assert grid.shape == (49,) and float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
    assert (wider[1:-1] > grid[1:-1]).all()  # more tokens, larger shift: every inner level rises
    for steps in (1, 2, 4, 8):  # the pipeline's linspace(1, 1/K, K), shifted, lies on the 48-interval grid
        assert torch.allclose(objective.sampler().timesteps(steps, shape), lcm_timesteps(grid, steps), atol=1e-6)

    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_config["use_dynamic_shifting"] and spec.recommended_steps == 4
    assert sorted(spec.steps) == [1, 2, 4, 8]
    pipe = with_student(diffusers.LTXPipeline, teacher, out)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_ltx_latents(pipe, cond, noise, spec.guidance_scale)
    print(f"ltx_lcm_lora, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert ours.abs().max() > 0.1 and (theirs - ours).abs().max() < TOLERANCE

    seen = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(pipeline.scheduler.sigmas[:-1].clone())  # the input levels (the last is 0)
        return callback_kwargs

    for steps in (2, 4, 8):
        seen.clear()
        stock_ltx_latents(pipe, cond, noise, spec.guidance_scale, steps=steps, callback_on_step_end=record)
        levels = objective.sampler().timesteps(steps, shape)
        assert len(seen) == steps and all(torch.allclose(s, levels, atol=1e-6) for s in seen), (seen, levels)


def test_a_grid_the_wan_pipeline_cannot_run_is_refused():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21"))
    student = Student.lora(teacher, rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"num_ddim_timesteps=50: WanPipeline takes no sigmas=.*multiple of 4"):
        LCM(LCMConfig(num_ddim_timesteps=50, ema_target=False), teacher, student)
    LCM(LCMConfig(num_ddim_timesteps=48, ema_target=False), teacher, student)  # accepted


def test_dynamic_shift_is_still_refused_where_the_pipeline_takes_sigmas():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:qwen_image"))  # QwenImagePipeline takes sigmas=
    with pytest.raises(ValueError, match="dynamic"):
        LCM(LCMConfig(ema_target=False), teacher, Student.lora(teacher, rank=4, alpha=8))


def test_pixel_pipelines_keep_their_skipping_grid():
    """The digits flow teacher is a DDPMPipeline, which takes no sigmas= either, but its export writes the sampling
    loop out: LCM keeps LCMScheduler's picks from any grid, 50 intervals included."""
    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-flow"))
    objective = LCM(LCMConfig(num_ddim_timesteps=50), teacher, Student.full(teacher))
    assert objective.pipeline_scheduler is None
    assert torch.equal(objective.sampler().timesteps(4), lcm_timesteps(objective.grid, 4))
