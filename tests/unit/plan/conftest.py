"""Recipes the planner is checked on: tiny digits and SD1.5-shaped runs that a CPU trains in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fewstep.config.load import validate_recipe
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

TRAIN = {"max_steps": 10, "sample_every": None, "progress": False, "checkpoint_every": 100, "log_every": 100}


def digits_lora(output_dir: Path, batch_size: int = 64) -> dict[str, Any]:
    """A rank-4 LoRA on the shipped digits teacher, plain denoising."""
    return {
        "teacher": {"pretrained": "fewstep:digits-vp"},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "diffusion"},
        "data": {"source": "digits", "batch_size": batch_size},
        "train": TRAIN,
        "output_dir": str(output_dir),
    }


def sd15_dmd2(output_dir: Path, batch_size: int = 4, resolution: int = 64, dtype: str = "float32") -> dict[str, Any]:
    """DMD2 on the tiny SD1.5: student and fake score as two LoRAs on one base, prompts, CFG 2 on the real branch."""
    return {
        "teacher": {"pretrained": "tiny:sd15", "dtype": dtype},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {
            "name": "dmd2",
            "health_reference_steps": 0,
            "fake_steps_per_generator_step": 1,
            "real_guidance_scale": 2.0,
            "resolution": resolution,
        },  # fmt: skip
        "data": {"source": "prompts", "prompts": ["a cat", "a dog"], "batch_size": batch_size},
        "train": TRAIN,
        "output_dir": str(output_dir),
    }


def digits_lcm_full(output_dir: Path) -> dict[str, Any]:
    """A full LCM student with its EMA target network (a frozen copy the objective holds) and EMA shadows."""
    return {
        "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
        "student": {"kind": "full"},
        "objective": {"name": "lcm", "ema_target": True, "guidance_embedding": False},
        "data": {"source": "digits", "batch_size": 8},
        "train": {**TRAIN, "ema_decay": 0.99},
        "output_dir": str(output_dir),
    }


RECIPES = {"digits_lora": digits_lora, "sd15_dmd2": sd15_dmd2, "digits_lcm_full": digits_lcm_full}


@pytest.fixture
def recipe_of(tmp_path: Path):
    def make(name: str, **kwargs: Any):
        return validate_recipe(RECIPES[name](tmp_path / name, **kwargs))

    return make
