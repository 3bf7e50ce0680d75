"""FLUX.2 [dev] export: LoRA students of the guidance-distilled tiny ``flux2`` teacher load in the stock
``Flux2Pipeline`` (``load_lora_weights``) with the exported scheduler, embed the guidance they were trained at, and
reproduce fewstep's one-step student (the pipeline's patchified latents in and out).

* DMD2: the export keeps the teacher's resolution shift; given ``sigmas=`` alone the pipeline shifts them with FLUX.2's
  ``μ`` at its default 50 steps, the ``μ`` the student's grid is built with, so its levels at 4 steps are the trained
  ones.
* sCM (rCM and TBCM share the sampler and its export): TrigFlow angles do not depend on the resolution, so the
  scheduler applies no shift and the trained levels are the ``sigmas``.

Between steps the stock scheduler draws its re-noise in the token layout from the global RNG, so several steps agree
in distribution, not draw for draw: the levels it runs are checked instead."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.scm import SCM, SCMConfig
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import (  # noqa: F401 (single_thread: a fixture)
    TOLERANCE,
    first_levels,
    move_lora_away,
    one_step_diff,
    single_thread,
    stock_lora_pipeline,
    train_dmd2_adapters,
)

PROMPTS = ["a red circle", "a small blue square on a table"]


def stock_flux2_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, guidance_scale: float | None = None,
                        **extra) -> torch.Tensor:  # fmt: skip
    """The stock pipeline's latents from fewstep's ``noise`` ``[b, 4c, h, w]`` (the pipeline's own noise layout) and
    prompt embeddings, in that layout again (``extra``: more pipeline arguments, e.g. ``callback_on_step_end``)."""
    _, _, h, w = noise.shape
    kwargs = {k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"}
    scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    out = pipe(
        prompt_embeds=cond.prompt_embeds, latents=noise.clone(), height=2 * h * pipe.vae_scale_factor,
        width=2 * w * pipe.vae_scale_factor, guidance_scale=scale, output_type="latent", **kwargs, **extra,
    ).images  # fmt: skip
    return pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(noise))


def test_stock_flux2_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:flux2", guidance_scale=4.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=1.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS)
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.recommended_steps == 4
    assert spec.scheduler_config["use_dynamic_shifting"] and spec.guidance_scale == 4.0
    assert "guidance_scale=4" in (out / "README.md").read_text()
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    for layer in (".to_q.", ".add_q_proj.", ".ff.linear_in.", ".ff_context.linear_out.", ".to_qkv_mlp_proj."):
        assert any(layer in k for k in keys), layer  # double-stream attention and MLPs, single-stream blocks
    assert not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe = stock_lora_pipeline(diffusers.Flux2Pipeline, teacher, out, spec)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours, _ = one_step_diff(
        objective, partial(stock_flux2_latents, pipe, spec, cond, noise, 1), cond, noise, "flux2 DMD2 LoRA"
    )
    levels = first_levels(partial(stock_flux2_latents, pipe, spec, cond, noise, 4), 4)
    trained = objective.sampler().timesteps(4, shape)
    assert (levels - trained).abs().max() < 1e-6, (levels, trained)
    unguided = stock_flux2_latents(pipe, spec, cond, noise, 1, guidance_scale=1.0)
    assert (unguided - ours).abs().max() > 100 * TOLERANCE, "the embedded guidance must matter"
    pipe.unload_lora_weights()
    base = stock_flux2_latents(pipe, spec, cond, noise, 1)
    assert (base - ours).abs().max() > 100 * TOLERANCE, "the LoRA must matter for the comparison to mean much"


def test_stock_flux2_pipeline_runs_the_trained_levels_of_an_scm_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:flux2", guidance_scale=4.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=1.0, mid_u=[1.1]), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift"] == 1.0
    assert spec.guidance_scale == 4.0
    levels = spec.steps[2]["levels"]
    u = torch.tensor(1.1)
    assert spec.steps[2]["sigmas"] == levels and abs(levels[1] - float(u.sin() / (u.sin() + u.cos()))) < 1e-6

    pipe = stock_lora_pipeline(diffusers.Flux2Pipeline, teacher, out, spec)
    cond, _ = encode_prompts(teacher, PROMPTS)
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))
    ours, _ = one_step_diff(
        objective, partial(stock_flux2_latents, pipe, spec, cond, noise, 1), cond, noise, "flux2 sCM LoRA"
    )
    assert torch.allclose(
        first_levels(partial(stock_flux2_latents, pipe, spec, cond, noise, 2), 2), torch.tensor(levels), atol=1e-6
    )
