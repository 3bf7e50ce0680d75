"""A tiny class-conditional digits teacher (a real ``DDPMPipeline`` directory) and recipes that train on it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from fewstep.config.load import dump_recipe, validate_recipe
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)


def tiny_digits_unet(seed: int = 0) -> UNet2DModel:
    """8×8, one channel, blocks at 8×8 and 4×4 (attention at 4×4), classes 0..9 plus the null class 10."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=11,
    )


def save_digits_teacher(path: Path) -> Path:
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
    )
    DDPMPipeline(unet=tiny_digits_unet(), scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def digits_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_digits_teacher(tmp_path_factory.mktemp("teacher") / "digits_vp")


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_data(teacher_dir: Path, output_dir: Path, **changes: Any) -> dict[str, Any]:
    """A short digits ``diffusion`` recipe as a dict; ``changes`` are merged block by block (``objective`` is
    replaced as a whole)."""
    base = {
        "teacher": {"pretrained": str(teacher_dir)},
        "student": {"kind": "full"},
        "objective": {"name": "diffusion", "cond_dropout": 0.2},
        "data": {"source": "digits", "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 4},
        "train": {
            "max_steps": 6,
            "checkpoint_every": 3,
            "keep_last": 5,
            "log_every": 1,
            "sample_every": None,
            "progress": False,
            "resume": "auto",
        },
        "output_dir": str(output_dir),
    }
    if "objective" in changes:
        base["objective"] = changes.pop("objective")
    return _merge(base, changes)


@pytest.fixture
def make_recipe(digits_teacher_dir: Path):
    def make(output_dir: Path, **changes: Any):
        return validate_recipe(recipe_data(digits_teacher_dir, output_dir, **changes))

    return make


@pytest.fixture
def write_recipe():
    """Write a recipe as YAML (what ``fewstep train`` reads)."""

    def write(recipe: Any, path: Path) -> Path:
        path.write_text(dump_recipe(recipe))
        return path

    return write
