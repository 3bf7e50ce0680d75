"""``fewstep plan`` on the image-to-video Wan recipes: the example forward feeds each family what training feeds it
(Wan 2.1 I2V: 16 noisy + 20 first-frame input channels and CLIP image tokens; TI2V-5B: 48-channel latents at 1/16 of
the pixels with a clean first latent frame), through fewstep's own adapter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fewstep.cli.main import main
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.plan.inputs import TrainingShape, backbone_forward, clip_image_tokens, wan_conditioning


@pytest.mark.parametrize("family", ["wan21_i2v", "wan22_ti2v"])
def test_plan_runs_on_the_image_to_video_recipes(family, capsys):
    status = main(["plan", f"dmd/{family}_dmd2_lora", f"teacher.pretrained=tiny:{family}", "--json"])
    assert status == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recommended"] and plan["layouts"]


@pytest.mark.parametrize("family", ["wan21_i2v", "wan22_ti2v"])
def test_example_forward_takes_the_first_frame_the_adapter_needs(family):
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    backbone = teacher.denoiser.backbone
    side = teacher.pipeline.default_video_size[1]
    shape = TrainingShape(batch=2, resolution=side, text_tokens=8, frames=5)
    x_shape = latent_shape(teacher, 2, side, 5)
    cond = wan_conditioning(backbone, teacher, x_shape, 8, "cpu", next(backbone.parameters()).dtype)
    if family == "wan21_i2v":
        assert x_shape == (2, 16, 2, 4, 4) and backbone.config.in_channels == 36
        assert cond.condition_latents.shape == (2, 20, 2, 4, 4)
        assert clip_image_tokens(teacher.pipeline) == 17  # the tiny CLIP: 4 × 4 patches and the class token
        assert cond.image_embeds.shape == (2, 17, backbone.config.image_dim)
    else:
        assert x_shape == (2, 48, 2, 4, 4)  # Wan 2.2's VAE: 16× in space
        assert cond.first_frame_latents.shape == (2, 48, 1, 4, 4)
    out = backbone_forward(backbone, teacher, shape, device="cpu")()
    assert tuple(out.shape) == x_shape
