"""The shipped Fashion-MNIST assets: small, documented conventions, and the teachers sample class-correct images
according to the shipped classifier (a few steps, a few images: seconds on a CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.assets import asset_path
from fewstep.data.fashion import DEFAULT_DIR
from fewstep.eval.classifier import load_classifier
from fewstep.models.conditioning import Conditioning
from fewstep.solvers.grids import linspace_grid, trailing_vp_grid

MAX_ASSET_BYTES = 3_000_000


@pytest.mark.parametrize("name", ["fashion-vp", "fashion-flow", "fashion-classifier"])
def test_assets_are_small_and_fp16(name):
    path = asset_path(name)
    files = [f for f in path.rglob("*") if f.is_file()]
    assert 0 < sum(f.stat().st_size for f in files) < MAX_ASSET_BYTES, name
    from safetensors import safe_open

    weights = [f for f in files if f.suffix == ".safetensors"]
    with safe_open(str(weights[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_teacher_configs_follow_the_documented_conventions():
    for name, scheduler_cls in (("fashion-vp", "DDPMScheduler"), ("fashion-flow", "FlowMatchEulerDiscreteScheduler")):
        path = asset_path(name)
        index = json.loads((path / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"][1] == scheduler_cls
        unet = json.loads((path / "unet" / "config.json").read_text())
        assert (unet["sample_size"], unet["in_channels"], unet["num_class_embeds"]) == (28, 1, 11)
        info = json.loads((path / "fewstep_teacher.json").read_text())
        assert info["null_class"] == 10 and info["command"].startswith("python scripts/train_fashion_teachers.py")
        assert info["eval_50_steps"]["w2_accuracy"] > 0.7
    config = json.loads((asset_path("fashion-classifier") / "config.json").read_text())
    assert (config["image_size"], config["num_features"]) == (28, 128) and config["test_accuracy"] > 0.85


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_classifier_recognises_real_test_images():
    from fewstep.data.fashion import fashion_images

    images, labels = fashion_images("test", DEFAULT_DIR, limit=500)
    assert float((load_classifier("fashion-classifier").predict(images) == labels).float().mean()) > 0.85


@pytest.mark.parametrize("name", ["fashion-vp", "fashion-flow"])
def test_teacher_samples_are_class_correct(name):
    from fewstep.config import TeacherConfig
    from fewstep.models.loading import load_teacher
    from fewstep.models.vae import decode_latents

    teacher = load_teacher(TeacherConfig(pretrained=f"fewstep:{name}", guidance_scale=2.0))
    assert teacher.family == "unet2d" and teacher.null_cond.class_labels.tolist() == [10]
    if name == "fashion-vp":
        assert (teacher.schedule.kind, teacher.denoiser.prediction_type) == ("vp", "epsilon")
        taus = trailing_vp_grid(8)
    else:
        assert (teacher.schedule.kind, teacher.denoiser.prediction_type) == ("flow", "flow")
        taus = linspace_grid(8)
    labels = torch.arange(30) % 10
    noise = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = decode_latents(teacher, teacher.sample(noise, Conditioning(class_labels=labels), taus))
    assert images.shape == (30, 1, 28, 28)
    assert float((load_classifier("fashion-classifier").predict(images) == labels).float().mean()) > 0.75
