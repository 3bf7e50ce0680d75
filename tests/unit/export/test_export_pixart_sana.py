"""PixArt-Σ and Sana export: a DMD2 LoRA student on each tiny teacher, exported, reproduces the student's 1, 2 and
4 step samples in the stock pipeline with the exported scheduler.

Sana: ``SanaPipeline.load_lora_weights`` reads the LoRA file. PixArt-Σ: diffusers has no LoRA loader for
``PixArtSigmaPipeline`` (nor ``PixArtTransformer2DModel``), so the export writes the merged pipeline, which
``PixArtSigmaPipeline.from_pretrained`` loads."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.objectives.protocol import Batch
from tests.helpers import TOLERANCE, single_thread  # noqa: F401 (fixture)

MAX_TOKENS = 16


def _trained_dmd2(family: str):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=4.5, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"], max_sequence_length=MAX_TOKENS)
    shape = latent_shape(teacher, 2)
    opts = {k: torch.optim.AdamW(list(m.parameters()), lr=1e-2) for k, m in objective.trainable().items()}
    for step in range(4):  # fake, then generator steps: both adapters move away from B = 0
        phase = "fake_score" if step % 2 == 0 else "student"
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, phase)
        opts[phase].zero_grad()
        out.loss.backward()
        opts[phase].step()
    return teacher, student, objective, cond, shape


def _max_diff_to_student(objective, pipe, spec, cond, shape) -> tuple[float, float]:
    """Stock pipeline vs the student's sampler at 1, 2 and 4 steps, the text passed with its attention mask:
    ``(max |Δ|, max |x|)``."""
    pipe.set_progress_bar_config(disable=True)
    side = shape[-1] * pipe.vae_scale_factor
    diffs, sizes = [], []
    for num_steps in (1, 2, 4):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + num_steps))
        ours = objective.sampler()(noise, cond, num_steps, torch.Generator().manual_seed(num_steps))
        torch.manual_seed(num_steps)
        theirs = pipe(
            prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_embeds_mask, latents=noise.clone(),
            height=side, width=side, use_resolution_binning=False, output_type="latent",
            generator=torch.Generator().manual_seed(num_steps), **spec.call_kwargs(num_steps),
        ).images  # fmt: skip
        assert ours.abs().max() > 0.1  # a real sample, not an empty tensor
        diffs.append((theirs.float() - ours).abs().max().item())
        sizes.append(ours.abs().max().item())
    return max(diffs), max(sizes)


@pytest.mark.parametrize("family", ["pixart_sigma", "sana"])
def test_stock_pipeline_reproduces_the_dmd2_lora_student(family, tmp_path):
    teacher, student, objective, cond, shape = _trained_dmd2(family)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.recommended_steps == 4
    pipe_cls = type(teacher.pipeline)
    if family == "sana":
        with safe_open(str(out / WEIGHT_NAME), "pt") as f:
            keys = list(f.keys())
        assert any(".attn2." in k for k in keys), "the cross-attention to the text carries LoRA layers too"
        assert not any(".fake." in k for k in keys), "only the student's adapter is exported"
        pipe = pipe_cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
        pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
        pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    else:
        assert not (out / WEIGHT_NAME).exists() and (out / "model_index.json").is_file()
        pipe = pipe_cls.from_pretrained(str(out), local_files_only=True)
        assert type(pipe.scheduler).__name__ == spec.scheduler_class
    diff, size = _max_diff_to_student(objective, pipe, spec, cond, shape)
    print(f"{family} DMD2 LoRA ({spec.scheduler_class}): max |stock − fewstep| = {diff:.2e}, max |x| = {size:.1f}")
    assert diff < TOLERANCE * max(1.0, size / 10)  # relative: PixArt-Σ latents reach ~700 (a random ε-model)
