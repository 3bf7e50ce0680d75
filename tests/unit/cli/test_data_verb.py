"""``fewstep data``: a recipe's starter data. A prompt file for prompts-only recipes; for image-folder recipes, images
drawn from the tiny teacher with their prompts as captions, reproducible, continued after an interruption, never
mixed with other settings or with a user's own folder; and a training run reads the folder back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep.cli.main import main
from fewstep.data.prompts import STARTER_PROMPTS
from tests.helpers import fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

TINY = ["teacher.pretrained=tiny:sd15", "data.resolution=32"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every command runs in the test's own directory: the recipes' relative data.path and output_dir land there."""
    monkeypatch.chdir(tmp_path)


def data_cli(capsys, tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    """``fewstep data ARGV`` (run in ``tmp_path``): (status, stdout, stderr)."""
    code = main(["data", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def listed(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_prompts_recipe_gets_the_starter_prompt_file_once(tmp_path, capsys):
    code, out, _ = data_cli(capsys, tmp_path, "dmd/sd3_dmd2_lora")
    assert code == 0 and "wrote 48 prompts to data/prompts.txt" in out
    lines = (tmp_path / "data" / "prompts.txt").read_text().splitlines()
    assert lines == list(STARTER_PROMPTS)

    (tmp_path / "data" / "prompts.txt").write_text("my own prompt\n")
    code, out, _ = data_cli(capsys, tmp_path, "dmd/sd3_dmd2_lora")
    assert code == 0 and "exists already: nothing written" in out
    assert (tmp_path / "data" / "prompts.txt").read_text() == "my own prompt\n"  # never overwritten


def test_image_folder_is_drawn_from_the_teacher_and_continued(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    args = ["lcm/sd15_lcm_lora", *TINY, "--prompts", str(prompts), "--steps", "2", "--batch-size", "2"]
    code, out, _ = data_cli(capsys, tmp_path, *args, "--num-images", "3")
    folder = tmp_path / "data" / "train_images"
    assert code == 0 and "data/train_images (3 images" in out
    rows = listed(folder)
    assert [r["text"] for r in rows] == ["a red circle", "a blue square", "a green triangle"]
    first = [np.asarray(Image.open(folder / r["file_name"])) for r in rows]
    assert all(a.shape == (32, 32, 3) for a in first) and not np.array_equal(first[0], first[1])

    code, out, _ = data_cli(capsys, tmp_path, *args, "--num-images", "5")  # continues: 2 more, the first 3 kept
    rows = listed(folder)
    assert code == 0 and len(rows) == 5 and rows[3]["text"] == "a red circle"
    assert all(np.array_equal(np.asarray(Image.open(folder / r["file_name"])), a) for r, a in zip(rows, first))
    settings = json.loads((folder / "fewstep_data.json").read_text())
    assert settings["next_index"] == 5 and settings["settings"]["num_inference_steps"] == 2
    assert settings["settings"]["guidance_scale"] == 7.5  # StableDiffusionPipeline's own default

    code, _, err = data_cli(capsys, tmp_path, *args[:-4], "--steps", "3", "--num-images", "6")
    assert code == 2
    one_error(err, "drawn with other settings", "num_inference_steps")
    assert len(listed(folder)) == 5  # nothing mixed in


def test_a_users_own_folder_is_never_added_to(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "mine"}\n')
    monkeypatch.setattr("fewstep.models.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded the teacher"))
    code, _, err = data_cli(capsys, tmp_path, "lcm/sd15_lcm_lora", *TINY, f"data.path={folder}", "--steps", "1")
    assert code == 2
    one_error(err, "fewstep data did not write")
    assert listed(folder) == [{"file_name": "a.png", "text": "mine"}]


@pytest.mark.parametrize(
    ("recipe", "status", "needle"),
    [("quickstart/digits_lcm", 0, "nothing to write"), ("reflow/sd3_reflow", 2, "fewstep pairs reflow/sd3_reflow")],
)
def test_sources_it_does_not_write_say_where_their_data_comes_from(tmp_path, capsys, recipe, status, needle):
    code, out, err = data_cli(capsys, tmp_path, recipe)
    assert code == status and needle in (out if status == 0 else one_error(err))


def test_training_reads_the_drawn_folder(tmp_path, capsys):
    """The tiny smoke run of docs/recipes.md: `fewstep data` then `fewstep train` with the same overrides."""
    code, _, _ = data_cli(capsys, tmp_path, "lcm/sd15_lcm_lora", *TINY, "--num-images", "2", "--steps", "1")
    assert code == 0
    train_args = [
        *TINY, "train.max_steps=1", "data.batch_size=2", "data.num_workers=0", "student.lora.rank=4",
        "student.gradient_checkpointing=false", "train.mixed_precision=no", "train.progress=false",
    ]  # fmt: skip
    assert main(["train", "lcm/sd15_lcm_lora", *train_args]) == 0
    assert (tmp_path / "runs" / "lcm" / "sd15_lcm_lora" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
