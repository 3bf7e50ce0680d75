"""Sampling an image-to-video student or teacher for evaluation: the first frames are passed next to the prompts
(``images=``, one for all or a ``{prompt: image}`` dict) and prepared for the clip the noise decodes to; Wan 2.1 I2V
without them is refused with what to pass."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.eval.harness import EvalInputs
from fewstep.eval.samplers import clip_size_of, student_sampler, teacher_sampler
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.models.vae import decode_latents
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import single_thread  # noqa: F401 (fixture)

PROMPTS = ["a red circle rolling", "a blue square falling"]


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21_i2v"))
    student = Student.lora(teacher, rank=4)
    objective = DMD2(DMD2Config(num_student_steps=4, health_reference_steps=0), teacher, student)
    return SimpleNamespace(teacher=teacher, student=student, objective=objective)


def test_student_sampler_conditions_on_the_first_frames(components):
    teacher = components.teacher
    shape = latent_shape(teacher, 2)
    assert clip_size_of(teacher.pipeline, shape) == (5, 32, 32)  # the tiny pipeline's clip: 2 latent frames of 4×4
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    inputs = EvalInputs(prompts=PROMPTS)

    with pytest.raises(ValueError, match=r"first frame: pass images= to teacher_sampler / student_sampler"):
        student_sampler(components, [1]).fn(noise, inputs, 1, torch.Generator().manual_seed(2))

    frames = {PROMPTS[0]: image(0), PROMPTS[1]: image(1)}
    video = student_sampler(components, [1], images=frames).fn(noise, inputs, 1, torch.Generator().manual_seed(2))
    cond, _ = encode_prompts(teacher, PROMPTS, images=[image(0), image(1)], resolution=(32, 32), num_frames=5)
    x0 = components.objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(2))
    expected = decode_latents(teacher, x0)
    assert video.shape == expected.shape and video.shape[2] == 5  # [b, 3, frames, H, W]
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)
    same = student_sampler(components, [1], images=image(0)).fn(noise, inputs, 1, torch.Generator().manual_seed(2))
    assert (same[1] - video[1]).abs().max() > 1e-4  # the second clip now starts from the first image

    with pytest.raises(ValueError, match="No first frame for the prompt"):
        student_sampler(components, [1], images={PROMPTS[0]: image(0)}).fn(noise, inputs, 1, torch.Generator())


def test_teacher_sampler_takes_first_frames_too(components):
    teacher = components.teacher
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))
    sampler = teacher_sampler(teacher, [2], guidance_scale=2.0, images=image(3))
    out = sampler.fn(noise, EvalInputs(prompts=PROMPTS), 2, torch.Generator().manual_seed(0))
    assert out.shape[:3] == (2, 3, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="first frame: pass images="):
        teacher_sampler(teacher, [2]).fn(noise, EvalInputs(prompts=PROMPTS), 2, torch.Generator())
