"""Qwen-Image export: a DMD2 LoRA student on the tiny ``qwen_image`` teacher (trained against the true-CFG teacher)
is written in the layout ``QwenImagePipeline.load_lora_weights`` accepts, and the stock pipeline with the exported
LoRA and scheduler reproduces the one-step student (packed latents in, packed latents out). Between steps the stock
scheduler draws its re-noise in the packed token layout from the global RNG, so several steps agree in distribution,
not draw for draw."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


def stock_qwen_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, seed: int, **extra) -> torch.Tensor:
    """The stock pipeline's latents from fewstep's unpacked ``noise`` and prompt embeddings, unpacked again
    (``extra``: more pipeline arguments, e.g. ``callback_on_step_end``)."""
    b, c, h, w = noise.shape
    height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
    kwargs = {k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"}
    kwargs["true_cfg_scale"] = 1.0  # the student is sampled without CFG
    out = pipe(
        prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_embeds_mask,
        latents=pipe._pack_latents(noise.clone(), b, c, h, w), height=height, width=width, output_type="latent",
        generator=torch.Generator().manual_seed(seed), **kwargs, **extra,
    ).images  # fmt: skip
    return pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)[:, :, 0]


def test_stock_qwen_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:qwen_image"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=4.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a small blue square on a table"])
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.recommended_steps == 4
    assert spec.scheduler_config["shift_terminal"] is None, "the student's levels end at 0, as trained"
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    for layer in (".to_q.", ".add_q_proj.", ".img_mlp.", ".txt_mlp."):  # attention and both MLP streams
        assert any(layer in k for k in keys), layer
    assert not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe = diffusers.QwenImagePipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_qwen_latents(pipe, spec, cond, noise, 1, 1)
    diff = (theirs - ours).abs().max().item()
    print(f"qwen_image DMD2 LoRA, 1 step: max |stock − fewstep| = {diff:.2e}")
    assert ours.abs().max() > 0.1
    assert diff < TOLERANCE
    pipe.unload_lora_weights()
    base = stock_qwen_latents(pipe, spec, cond, noise, 1, 1)
    assert (base - ours).abs().max() > 100 * TOLERANCE, "the LoRA must matter for the comparison to mean much"
