"""Quiet, honest output: known-benign third-party notices are silenced only around the call that triggers them (and
still show elsewhere), logs hold no cursor-up escapes, a two-process run prints its messages once, and sample grids
say what each row and column is."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data.images import grid_image
from tests.helpers import (  # noqa: F401 (fixtures)
    digits_lora_recipe,
    fresh_accelerate_state,
    launch_two_command,
    single_thread,
    subprocess_env,
)

ROOT = Path(__file__).resolve().parents[2]
CURSOR_UP = "\x1b[A"
PEFT_NOTICE = "Already found a `peft_config`"
IMAGE_PROCESSOR_NOTICE = "requires torchvision (not installed); falling back to"


def run_python(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``tmp_path`` with stderr captured (not a terminal), offline, this checkout first on the
    path; ``env`` adds variables."""
    env = {**subprocess_env(tmp_path), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------ third-party notices


def test_a_tiny_text_to_image_run_logs_no_escapes_and_no_benign_notices(tmp_path):
    """Phased DMD on the tiny SD1.5, built from scratch in a fresh cache: the zoo writes and loads the pipeline, the
    student's LoRA and then the fake score's and the second expert's adapters are added to the one base."""
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    result = run_python(
        tmp_path, "-m", "fewstep", "train", "dmd/sd15_phased_dmd_lora", "teacher.pretrained=tiny:sd15",
        "data.path=prompts.txt", "train.max_steps=2", "data.batch_size=1", "student.lora.rank=4",
        "student.gradient_checkpointing=false", "train.mixed_precision=no", "train.sample_every=2",
        "train.sample_steps=[4]", "train.num_sample_images=2", "train.checkpoint_every=2", "output_dir=run",
        "objective.phase_train_steps=[1,1]", FEWSTEP_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert CURSOR_UP not in result.stderr, result.stderr[-2000:]
    assert IMAGE_PROCESSOR_NOTICE not in result.stderr
    assert PEFT_NOTICE not in result.stderr
    assert result.stdout.count("run directory: run") == 1
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="with torchvision there is no notice")
def test_the_image_processor_notice_is_dropped_only_while_a_pipeline_loads(tmp_path):
    script = (
        "import sys; from fewstep.models.loading import load_pipeline; load_pipeline('tiny:sd15'); "
        "print('LOADED', file=sys.stderr, flush=True); from transformers import ViTImageProcessor"
    )
    result = run_python(tmp_path, "-c", script)
    assert result.returncode == 0, result.stderr
    during, after = result.stderr.split("LOADED")
    assert IMAGE_PROCESSOR_NOTICE not in during  # CLIPImageProcessor and SiglipImageProcessor, imported by the load
    assert "`ViTImageProcessor` " + IMAGE_PROCESSOR_NOTICE in after  # transformers' own notice outside the load


def test_the_peft_notice_is_dropped_only_where_fewstep_adds_its_second_adapter():
    from peft import LoraConfig

    from fewstep.models.loading import load_teacher
    from fewstep.models.student import Student
    from fewstep.objectives.dmd.roles import add_adapter

    class Cfg:
        pretrained = "tiny:sd15"

    student = Student.lora(load_teacher(Cfg()), rank=2)
    backbone = student.denoiser.backbone
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapter(backbone, config, "fake_score")  # on purpose: a second adapter on the shared base
    assert not [w for w in caught if PEFT_NOTICE in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone.add_adapter(config, adapter_name="third")  # anyone else's second adapter still hears about it
    assert [w for w in caught if PEFT_NOTICE in str(w.message)]


# ------------------------------------------------------------------------------------------------- once per job


@pytest.mark.slow
def test_two_processes_print_their_messages_once(tmp_path):
    from fewstep.config import validate_recipe
    from fewstep.config.load import dump_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_recipe(validate_recipe(digits_lora_recipe(tmp_path / "run", max_steps=2))))
    env = {**subprocess_env(tmp_path), "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1",
           "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
    command = launch_two_command(recipe)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"run directory: {tmp_path / 'run'}") == 1, result.stdout

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("is already complete at step 2") == 1, again.stdout


# ------------------------------------------------------------------------------------------------- labelled grids


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return int((np.asarray(image.convert("L").crop(box)) < 128).sum())


def test_grid_labels_sit_in_a_margin_and_leave_the_tiles_alone():
    rows = [torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    plain = grid_image(rows, gap=2)
    labelled = grid_image(rows, gap=2, row_labels=["1 step", "2 steps"], column_labels=["0", "1", "a long prompt"])
    left, top = labelled.width - plain.width, labelled.height - plain.height
    assert left > 0 and top > 0
    assert np.array_equal(np.asarray(labelled.crop((left, top, labelled.width, labelled.height))), np.asarray(plain))
    assert dark_pixels(labelled, (0, top, left, labelled.height)) > 0  # row labels
    assert dark_pixels(labelled, (left, 0, labelled.width, top)) > 0  # column labels
    assert grid_image(rows, gap=2).size == plain.size  # no labels, no margin


def test_the_training_grid_is_labelled_with_steps_and_classes(tmp_path):
    from fewstep.config import validate_recipe
    from fewstep.train.loop import train

    recipe = digits_lora_recipe(tmp_path / "run", max_steps=1, sample_every=1)
    recipe["train"].update(sample_steps=[1, 2], num_sample_images=4)
    run = train(validate_recipe(recipe))
    grid = Image.open(run / "samples" / "step_00000001.png")
    tiles = grid_image([torch.zeros(4, 1, 8, 8)] * 2)  # the same grid without labels: 2 rows of 4 digits
    left, top = grid.width - tiles.width, grid.height - tiles.height
    assert left > 0 and top > 0
    assert dark_pixels(grid, (0, top, left, grid.height)) > 0 and dark_pixels(grid, (left, 0, grid.width, top)) > 0
