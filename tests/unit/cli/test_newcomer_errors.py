"""What a newcomer's first mistakes print: missing data fails before any model loads and says how to get the data;
a file given where a run or export directory belongs is named for what it is, with what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.cli.main import main
from fewstep.config import load_recipe
from fewstep.config.errors import RecipeError
from tests.helpers import fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[3]
TINY = ["teacher.pretrained=tiny:sd15", "data.resolution=32"]


@pytest.fixture
def empty_model_cache(tmp_path, monkeypatch) -> Path:
    """A fresh ``FEWSTEP_CACHE``: the tiny teacher is built there on first load, so an empty one after a command
    shows that no model was loaded. The command runs in ``tmp_path``, where the recipe's data.path is missing."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEWSTEP_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_train_without_data_fails_before_loading_and_says_how_to_get_it(empty_model_cache, capsys):
    assert main(["train", "lcm/sd15_lcm_lora", *TINY]) == 2
    err = capsys.readouterr().err
    assert "data.path: does not exist" in err and "'data/train_images'" in err
    assert "metadata.jsonl" in err  # the layout of a folder of your own
    assert "`fewstep data lcm/sd15_lcm_lora teacher.pretrained=tiny:sd15 data.resolution=32 --num-images 64`" in err
    assert not (empty_model_cache / "tiny").exists(), "a model was loaded before the data path was checked"


def test_prompts_recipe_without_its_file_names_the_starter_command(empty_model_cache, capsys):
    assert main(["validate", "dmd/sd3_dmd2_lora"]) == 2
    err = capsys.readouterr().err
    assert "data.path: does not exist" in err and "`fewstep data dmd/sd3_dmd2_lora`" in err


def test_the_python_train_checks_the_data_before_loading(empty_model_cache):
    from fewstep.train.loop import train

    with pytest.raises(RecipeError, match="data.path: does not exist"):
        train(load_recipe("lcm/sd15_lcm_lora", TINY))
    assert not (empty_model_cache / "tiny").exists()


def test_export_of_a_file_says_it_is_a_file_and_what_export_takes(capsys):
    assert main(["export", str(ROOT / "README.md"), "--out", "unused"]) == 2
    line = one_error(capsys.readouterr().err, "README.md' is a file, not a directory", "training run directory")
    assert "does not exist" not in line


def test_export_of_an_export_says_so(tmp_path, capsys):
    (tmp_path / "fewstep_student.json").write_text("{}")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "again")]) == 2
    one_error(capsys.readouterr().err, "is an export (fewstep_student.json), not a training run")


def test_eval_of_a_file_says_it_is_a_file_and_lists_what_eval_takes(capsys):
    assert main(["eval", str(ROOT / "README.md")]) == 2
    line = one_error(capsys.readouterr().err, "README.md' is a file, not a directory")
    assert "does not exist" not in line
    for expected in ("resolved_config.yaml", "fewstep_student.json", "model_index.json", "tiny:<family>", "Hub id"):
        assert expected in line, expected


def test_a_missing_run_directory_still_says_it_does_not_exist(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    one_error(capsys.readouterr().err, "nowhere' does not exist", "training run directory")
