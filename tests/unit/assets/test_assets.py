"""The shipped digits assets: names resolve, errors help, the teachers load through the loader and sample digits."""

from __future__ import annotations

import json

import pytest
import torch

import fewstep.assets as assets
from fewstep.assets import asset_names, asset_path
from fewstep.models.conditioning import Conditioning
from fewstep.solvers.grids import linspace_grid, trailing_vp_grid

MAX_ASSET_BYTES = 2_500_000


def test_every_asset_resolves_and_is_small():
    assert asset_names() == [
        "digits-classifier", "digits-flow", "digits-vp", "fashion-classifier", "fashion-flow", "fashion-vp",
        "moving-digits-flow",
    ]  # fmt: skip
    for name in asset_names():
        path = asset_path(name)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert path.is_dir() and 0 < size < MAX_ASSET_BYTES, (name, size)
    assert asset_path("digits_vp") == asset_path("digits-vp")  # underscores are accepted


def test_unknown_asset_lists_the_names():
    with pytest.raises(ValueError, match="Did you mean 'digits-vp'") as err:
        asset_path("digits-vpp")
    assert all(name in str(err.value) for name in asset_names())


def test_missing_asset_names_the_rebuild_command(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/train_digits_teachers.py --variant flow"):
        asset_path("digits-flow")
    with pytest.raises(FileNotFoundError, match=r"scripts/train_digits_classifier.py"):
        asset_path("digits-classifier")


def test_teacher_configs_follow_the_documented_conventions():
    for name, scheduler_cls in (("digits-vp", "DDPMScheduler"), ("digits-flow", "FlowMatchEulerDiscreteScheduler")):
        path = asset_path(name)
        index = json.loads((path / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"][1] == scheduler_cls
        unet = json.loads((path / "unet" / "config.json").read_text())
        assert (unet["sample_size"], unet["in_channels"], unet["num_class_embeds"]) == (8, 1, 11)
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        if name == "digits-vp":
            assert scheduler["prediction_type"] == "epsilon" and scheduler["clip_sample"] is False
            assert scheduler["num_train_timesteps"] == 1000
        else:
            assert scheduler["shift"] == 1.0
    config = json.loads((asset_path("digits-classifier") / "config.json").read_text())
    assert config["num_features"] == 64 and config["test_accuracy"] > 0.95


@pytest.mark.parametrize("name", ["digits-vp", "digits-flow"])
def test_teacher_samples_are_recognisable_digits(name):
    from fewstep.config import TeacherConfig
    from fewstep.eval.digits import DigitsMetrics
    from fewstep.models.loading import load_teacher
    from fewstep.models.vae import decode_latents

    teacher = load_teacher(TeacherConfig(pretrained=f"fewstep:{name}", guidance_scale=2.0))
    assert teacher.family == "unet2d" and teacher.null_cond.class_labels.tolist() == [10]
    if name == "digits-vp":
        assert (teacher.schedule.kind, teacher.denoiser.prediction_type) == ("vp", "epsilon")
        taus = trailing_vp_grid(50)
    else:
        assert (teacher.schedule.kind, teacher.denoiser.prediction_type) == ("flow", "flow")
        assert teacher.schedule.timestep_scale == 1000.0
        taus = linspace_grid(50)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    noise = torch.randn(100, 1, 8, 8, generator=generator)
    images = decode_latents(teacher, teacher.sample(noise, Conditioning(class_labels=labels), taus))
    assert DigitsMetrics().accuracy(images, labels) > 0.85
