"""Wan 2.1 image-to-video DMD2 export: the student's LoRA loads in the stock ``WanImageToVideoPipeline``
(``load_lora_weights``) and, with the exported scheduler, reproduces fewstep's 4-step student sample for the same
first frame, on video latents ``[b, 16, f, h, w]``. The student is conditioned as the teacher is: the first frame's
condition latents and CLIP tokens ride in ``Conditioning``, so DMD2's generator, real and fake branches see them. The
exported scheduler's own 4-step grid is the trained one, and its re-noise draws match fewstep's for the same seed."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


def stock_i2v_latents(pipe, image, cond, noise: torch.Tensor, steps: int = 4, seed: int = 4) -> torch.Tensor:
    """The stock ``WanImageToVideoPipeline``'s latents from fewstep's ``noise`` (guidance 1: no negative); its
    scheduler re-noises from the global RNG, seeded with ``seed``."""
    _, _, f, h, w = noise.shape
    torch.manual_seed(seed)
    return pipe(
        image=image, prompt_embeds=cond.prompt_embeds, latents=noise.clone(), num_inference_steps=steps,
        guidance_scale=1.0, height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1, output_type="latent",
    ).frames  # fmt: skip


def test_stock_wan_i2v_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21_i2v"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=5.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (32, 32, 3)).astype(np.uint8))
    prompts = ["a red circle rolling", "a blue square falling"]
    cond, uncond = encode_prompts(teacher, prompts, max_sequence_length=32, images=[image])
    shape = latent_shape(teacher, 2)
    assert shape == (2, 16, 2, 4, 4)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export", base_model=teacher.pipeline.name_or_path)
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.guidance_scale == 1.0
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys) and not any(".fake." in k for k in keys)

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 4, torch.Generator().manual_seed(4))
    theirs = stock_i2v_latents(pipe, image, cond, noise)  # the exported scheduler's own 4-step grid: the trained one
    assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
    print(f"Wan 2.1 I2V DMD2 LoRA, 4 steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()  # the LoRA is what makes the stock pipeline the student
    assert (stock_i2v_latents(pipe, image, cond, noise) - ours).abs().max() > 100 * TOLERANCE
