"""Chroma export: LoRA students of the tiny ``chroma`` teacher (trained against its true CFG) load in the stock
``ChromaPipeline`` (``load_lora_weights``, Flux's LoRA loader) without warnings, with the exported scheduler, and
reproduce fewstep's one-step student from the same prompt embeddings and masks (Flux's packed latents in and out).
The student is sampled without CFG: the export's ``guidance_scale`` is 1, which the pipeline reads as no negative
branch.

* DMD2: the export keeps the teacher's resolution shift; given ``sigmas=`` the pipeline shifts them with the ``μ`` of
  the image's token count, which the student's grid is built with, so its levels at 4 steps are the trained ones.
* sCM (rCM and TBCM share the sampler and its export): TrigFlow angles do not depend on the resolution, so the
  scheduler applies no shift and the trained levels are the ``sigmas``.

Between steps the stock scheduler draws its re-noise in the packed token layout from the global RNG, so several steps
agree in distribution, not draw for draw: the levels it runs are checked instead."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape, pack_latents, unpack_latents
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

# Flux's LoRA loader always tries the text encoder; its notice that the T5 got no LoRA keys is expected (fewstep
# trains the transformer only).
T5_NOTICE = ("No LoRA keys associated to T5EncoderModel",)
PROMPTS = ["a red circle", "a small blue square on a table"]


def stock_chroma_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, **extra) -> torch.Tensor:
    """The stock pipeline's latents from fewstep's unpacked ``noise`` ``[b, c, h, w]``, prompt embeddings and masks
    (the float 0/1 masks the pipeline makes itself), unpacked again (``extra``: e.g. ``callback_on_step_end``)."""
    _, _, h, w = noise.shape
    out = pipe(
        prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_embeds_mask.float(),
        latents=pack_latents(noise.clone()), height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
        output_type="latent", **spec.call_kwargs(num_steps), **extra,
    ).images  # fmt: skip
    return unpack_latents(out, h, w)


def test_stock_chroma_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:chroma", guidance_scale=5.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=5.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS)
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.recommended_steps == 4
    assert spec.scheduler_config["use_dynamic_shifting"] and spec.guidance_scale == 1.0
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    for layer in (".to_q.", ".add_q_proj.", ".ff.net.0.proj.", ".ff_context.net.2."):  # attention and both MLPs
        assert any(layer in k for k in keys), layer
    assert any("single_transformer_blocks" in k for k in keys), "the single-stream blocks' attention"
    assert not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe = stock_lora_pipeline(diffusers.ChromaPipeline, teacher, out, spec, expected=T5_NOTICE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours, _ = one_step_diff(
        objective, partial(stock_chroma_latents, pipe, spec, cond, noise, 1), cond, noise, "chroma DMD2 LoRA"
    )
    levels = first_levels(partial(stock_chroma_latents, pipe, spec, cond, noise, 4), 4)
    trained = objective.sampler().timesteps(4, shape)
    assert (levels - trained).abs().max() < 1e-6, (levels, trained)
    pipe.unload_lora_weights()
    base = stock_chroma_latents(pipe, spec, cond, noise, 1)
    assert (base - ours).abs().max() > 100 * TOLERANCE, "the LoRA must matter for the comparison to mean much"


def test_stock_chroma_pipeline_runs_the_trained_levels_of_an_scm_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:chroma", guidance_scale=5.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=5.0, mid_u=[1.1]), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift"] == 1.0
    assert spec.guidance_scale == 1.0
    levels = spec.steps[2]["levels"]
    u = torch.tensor(1.1)
    assert spec.steps[2]["sigmas"] == levels and abs(levels[1] - float(u.sin() / (u.sin() + u.cos()))) < 1e-6

    pipe = stock_lora_pipeline(diffusers.ChromaPipeline, teacher, out, spec, expected=T5_NOTICE)
    cond, _ = encode_prompts(teacher, PROMPTS)
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))
    ours, _ = one_step_diff(
        objective, partial(stock_chroma_latents, pipe, spec, cond, noise, 1), cond, noise, "chroma sCM LoRA"
    )
    assert torch.allclose(
        first_levels(partial(stock_chroma_latents, pipe, spec, cond, noise, 2), 2), torch.tensor(levels), atol=1e-6
    )
