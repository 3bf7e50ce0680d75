"""HunyuanVideo 1.5 export: a DMD2 LoRA student and a continuous-time (sCM) LoRA student of the tiny ``hunyuan15``
teacher, exported, reproduce fewstep's student samples in the stock ``HunyuanVideo15Pipeline``.

diffusers has no LoRA loader for ``HunyuanVideo15Pipeline`` (nor its transformer), so the export writes the merged
pipeline, which ``HunyuanVideo15Pipeline.from_pretrained`` loads with the exported scheduler and a guider at the
student's guidance 1 (the pipeline reads its CFG scale from its ``guider`` component, not from a call argument). The
pipeline takes ``sigmas=``: the student's levels are passed as they are, and its scheduler re-noises between steps from
the global RNG in fewstep's own ``[b, c, f, h, w]`` layout, so several steps agree draw for draw. Measured on the tiny
model: DMD2 max |Δ| 3.6e-7 (1, 2 and 4 steps), sCM 7.2e-6 (1 and 2 steps); image-to-video DMD2 4.8e-7 (1 and 4
steps) and sCM 7.0e-6 (1 and 2 steps) in the stock ``HunyuanVideo15ImageToVideoPipeline``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline
from PIL import Image

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.scm import SCM, SCMConfig
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, move_lora_away, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)

PROMPTS = ["a red circle rolling", 'a sign that reads "STOP" in the rain']


def stock_hunyuan15_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    """The stock pipeline's latents from fewstep's ``noise`` and both prompt streams; its scheduler re-noises from
    the global RNG, seeded with ``seed`` (fewstep's sampler draws the same noise from a generator seeded alike)."""
    kwargs = {k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"}  # the guider's
    _, _, f, h, w = noise.shape
    torch.manual_seed(seed)
    return pipe(
        prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_embeds_mask,
        prompt_embeds_2=cond.prompt_embeds_2, prompt_embeds_mask_2=cond.prompt_embeds_mask_2, latents=noise.clone(),
        num_frames=4 * (f - 1) + 1, height=8 * h, width=8 * w, output_type="latent", **kwargs,
    ).frames  # fmt: skip


def _stock_pipeline(out, spec):
    assert not (out / WEIGHT_NAME).exists() and (out / "model_index.json").is_file()  # merged: no LoRA loader
    pipe = HunyuanVideo15Pipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.scheduler).__name__ == spec.scheduler_class
    assert pipe.guider.guidance_scale == spec.guidance_scale == 1.0, "the exported guider runs no CFG"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(objective, pipe, spec, cond, shape, steps) -> float:
    diffs = []
    for num_steps in steps:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + num_steps))
        ours = objective.sampler()(noise, cond, num_steps, torch.Generator().manual_seed(num_steps))
        theirs = stock_hunyuan15_latents(pipe, spec, cond, noise, num_steps, num_steps)
        assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
        diffs.append((theirs - ours).abs().max().item())
        print(f"hunyuan15 {spec.objective}, {num_steps} step(s): max |stock − fewstep| = {diffs[-1]:.2e}")
    return max(diffs)


@pytest.fixture()
def teacher():  # one per test: each student adds its adapters to the teacher's backbone
    torch.manual_seed(0)
    return load_teacher(SimpleNamespace(pretrained="tiny:hunyuan15", guidance_scale=6.0))


def test_stock_pipeline_reproduces_the_dmd2_lora_student(teacher, tmp_path):
    torch.manual_seed(0)
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=6.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS)
    shape = latent_shape(teacher, 2)
    assert shape == (2, 4, 2, 4, 4)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.recommended_steps == 4 and spec.guidance_scale == 1.0
    card = (out / "README.md").read_text()
    assert "HunyuanVideo15Pipeline.from_pretrained" in card and "guidance_scale=" not in card.split("```python")[1]
    pipe = _stock_pipeline(out, spec)
    assert _compare(objective, pipe, spec, cond, shape, (1, 2, 4)) < TOLERANCE
    base = HunyuanVideo15Pipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    base.scheduler, base.guider = pipe.scheduler, pipe.guider
    base.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    teacher_one_step = stock_hunyuan15_latents(base, spec, cond, noise, 1, 1)
    assert (teacher_one_step - ours).abs().max() > 100 * TOLERANCE, "the trained weights must matter"


def test_stock_pipeline_reproduces_the_scm_lora_student(teacher, tmp_path):
    torch.manual_seed(0)
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=6.0, mid_u=[1.1]), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    levels = spec.steps[2]["levels"]
    u = torch.tensor(1.1)
    assert abs(levels[1] - float(u.sin() / (u.sin() + u.cos()))) < 1e-6  # the trained angle, unshifted
    pipe = _stock_pipeline(out, spec)
    cond, _ = encode_prompts(teacher, PROMPTS)
    assert _compare(objective, pipe, spec, cond, latent_shape(teacher, 2), (1, 2)) < TOLERANCE


def _i2v_teacher_and_frame():
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:hunyuan15_i2v", guidance_scale=6.0))
    image = Image.fromarray(
        torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(3)).byte().numpy()
    )
    return teacher, image


def _compare_i2v(objective, out, cond, image, shape, steps) -> float:
    """Max |stock − fewstep| over ``steps`` in the stock image-to-video pipeline loaded from the export ``out``."""
    spec = read_schedule(out)
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.guider.guidance_scale == spec.guidance_scale == 1.0
    pipe.set_progress_bar_config(disable=True)
    _, _, f, _, _ = shape
    diffs = []
    for num_steps in steps:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + num_steps))
        ours = objective.sampler()(noise, cond, num_steps, torch.Generator().manual_seed(num_steps))
        kwargs = {k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"}
        torch.manual_seed(num_steps)
        theirs = pipe(
            image=image, prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_embeds_mask,
            prompt_embeds_2=cond.prompt_embeds_2, prompt_embeds_mask_2=cond.prompt_embeds_mask_2,
            latents=noise.clone(), num_frames=4 * (f - 1) + 1, output_type="latent", **kwargs,
        ).frames  # fmt: skip
        assert ours.abs().max() > 0.1
        diffs.append((theirs - ours).abs().max().item())
        print(f"hunyuan15_i2v {spec.objective}, {num_steps} step(s): max |stock − fewstep| = {diffs[-1]:.2e}")
    return max(diffs)


def test_stock_image_to_video_pipeline_reproduces_the_dmd2_student(tmp_path):
    teacher, image = _i2v_teacher_and_frame()
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=6.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS, images=[image])
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)
    out = export_student(student, teacher, objective, tmp_path / "export")
    assert _compare_i2v(objective, out, cond, image, shape, (1, 4)) < TOLERANCE


def test_stock_image_to_video_pipeline_reproduces_the_scm_student(tmp_path):
    teacher, image = _i2v_teacher_and_frame()
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=6.0, mid_u=[1.1]), teacher, student)
    cond, _ = encode_prompts(teacher, PROMPTS, images=[image])
    out = export_student(student, teacher, objective, tmp_path / "export")
    assert read_schedule(out).objective == "scm"
    assert _compare_i2v(objective, out, cond, image, latent_shape(teacher, 2), (1, 2)) < TOLERANCE
