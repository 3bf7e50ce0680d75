"""Wan 2.2 TI2V-5B DMD2 export: the student's LoRA loads in the stock pipelines of both of its modes and, with the
exported scheduler, reproduces fewstep's 4-step student sample: text-to-video in ``WanPipeline`` and, for the same
first frame, image-to-video in ``WanImageToVideoPipeline`` (``expand_timesteps``), on latents ``[b, 48, f, h, w]``."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import numpy as np
import torch
from PIL import Image

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


def _with_student(cls, teacher, out):
    pipe = cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_wan_ti2v_pipelines_reproduce_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22_ti2v"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=5.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (64, 64, 3)).astype(np.uint8))
    prompts = ["a red circle rolling", "a blue square falling"]
    cond, uncond = encode_prompts(teacher, prompts, max_sequence_length=32, images=[image])  # image-to-video
    text, text_uncond = encode_prompts(teacher, prompts, max_sequence_length=32)  # text-to-video
    shape = latent_shape(teacher, 2)
    assert shape == (2, 48, 2, 4, 4)
    train_dmd2_adapters(objective, cond, uncond, shape, steps=2)  # both modes train: first frames, then none
    train_dmd2_adapters(objective, text, text_uncond, shape, steps=2)

    out = export_student(student, teacher, objective, tmp_path / "export", base_model=teacher.pipeline.name_or_path)
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.guidance_scale == 1.0
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    _, _, f, h, w = shape
    size = {"num_frames": 4 * (f - 1) + 1, "height": 16 * h, "width": 16 * w}
    call = {"num_inference_steps": 4, "guidance_scale": 1.0, "output_type": "latent", **size}  # the trained grid

    t2v = _with_student(diffusers.WanPipeline, teacher, out)
    ours = objective.sampler()(noise, text, 4, torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # the scheduler re-noises from the global RNG
    theirs = t2v(prompt_embeds=text.prompt_embeds, latents=noise.clone(), **call).frames
    print(f"Wan 2.2 TI2V DMD2 LoRA, text-to-video, 4 steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert ours.abs().max() > 0.1 and (theirs - ours).abs().max() < TOLERANCE

    i2v = _with_student(diffusers.WanImageToVideoPipeline, teacher, out)
    ours = objective.sampler()(noise, cond, 4, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    theirs = i2v(image=image, prompt_embeds=cond.prompt_embeds, latents=noise.clone(), **call).frames
    print(f"Wan 2.2 TI2V DMD2 LoRA, image-to-video, 4 steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    torch.testing.assert_close(ours[:, :, :1], cond.first_frame_latents, atol=1e-5, rtol=0)
    assert (theirs - ours).abs().max() < TOLERANCE
    i2v.unload_lora_weights()  # the LoRA is what makes the stock pipeline the student
    torch.manual_seed(1)
    base = i2v(image=image, prompt_embeds=cond.prompt_embeds, latents=noise.clone(), **call).frames
    assert (base - ours).abs().max() > 100 * TOLERANCE
