"""Loading recipes: paths and shipped names, YAML rules, overrides, file errors, dump round trips."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import fewstep.config.load as load_module
from fewstep.config import RecipeError, apply_overrides, dump_recipe, list_recipes, load_recipe, resolve_recipe
from fewstep.config.load import parse_override, parse_yaml, recipe_description, recipes_dir
from fewstep.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[3]


class _LoadTestObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["_test_objective_load"] = "_test_objective_load"
    w_min: float = Field(3.0, ge=0.0)
    segments: list[int] = Field(default_factory=lambda: [8, 4, 2, 1])


class _LoadTestObjective:
    Config = _LoadTestObjectiveConfig


@pytest.fixture(autouse=True)
def test_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES._items, "_test_objective_load", _LoadTestObjective)


RECIPE = """\
description: >
  A small recipe
  for tests
teacher:
  pretrained: fewstep:digits-vp
  guidance_scale: 2
objective:
  name: _test_objective_load
  w_min: 1
data:
  source: digits
  batch_size: 4
optim:
  lr: 1e-4          # YAML 1.1 would read this as a string
  eps: 1e-8
train:
  max_steps: 20
  mixed_precision: no   # YAML 1.1 would read this as false
  progress: false
output_dir: runs/test
"""


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_load_from_path_with_yaml12_scalars(recipe_file):
    recipe = load_recipe(recipe_file)
    assert recipe.description == "A small recipe for tests\n"
    assert recipe.optim.lr == 1e-4 and recipe.optim.eps == 1e-8
    assert recipe.train.mixed_precision == "no" and recipe.train.progress is False
    assert recipe.teacher.guidance_scale == 2.0 and recipe.objective.w_min == 1.0
    assert recipe.data.batch_size == 4 and recipe.train.max_steps == 20


def test_yaml_rules():
    assert parse_yaml("a: no\nb: yes\nc: off\nd: true\ne: 1e-4\nf: 3\ng: .5\nh: 1.0e+3\ni: 1_0") == {
        "a": "no",
        "b": "yes",
        "c": "off",
        "d": True,
        "e": 1e-4,
        "f": 3,
        "g": 0.5,
        "h": 1000.0,
        "i": 10,
    }
    assert isinstance(parse_yaml("x: 3")["x"], int) and parse_yaml("x: -2.5e-3")["x"] == -2.5e-3


@pytest.mark.parametrize(
    ("override", "keys", "value"),
    [
        ("train.max_steps=2", ("train", "max_steps"), 2),
        ("teacher.pretrained=tiny:sd15", ("teacher", "pretrained"), "tiny:sd15"),
        ("train.sample_steps=[1,2]", ("train", "sample_steps"), [1, 2]),
        ("student.lora=null", ("student", "lora"), None),
        ("optim.lr=3e-4", ("optim", "lr"), 3e-4),
        ("train.mixed_precision=no", ("train", "mixed_precision"), "no"),
        ("train.progress=false", ("train", "progress"), False),
        ("description=a = b", ("description",), "a = b"),
        ("student.lora={rank: 8, alpha: 8}", ("student", "lora"), {"rank": 8, "alpha": 8}),
    ],
)
def test_parse_override(override, keys, value):
    assert parse_override(override) == (keys, value)


def test_overrides_reach_every_type_and_depth(recipe_file):
    recipe = load_recipe(
        recipe_file,
        [
            "train.max_steps=2",
            "teacher.pretrained=tiny:sd15",
            "train.sample_steps=[1,2]",
            "optim.lr=3e-4",
            "student.lora.rank=8",
            "student.lora.target_modules=[to_q, to_v]",
            "eval.every_steps=5",
            "objective.segments=[4,1]",
            "data.shuffle=false",
            "train.ema_decay=0.99",
        ],
    )
    assert recipe.train.max_steps == 2 and recipe.teacher.pretrained == "tiny:sd15"
    assert recipe.train.sample_steps == [1, 2] and recipe.optim.lr == 3e-4
    assert recipe.student.lora.rank == 8 and recipe.student.lora.target_modules == ["to_q", "to_v"]
    assert recipe.eval.every_steps == 5 and recipe.objective.segments == [4, 1]
    assert recipe.data.shuffle is False and recipe.train.ema_decay == 0.99
    full = load_recipe(recipe_file, ["student.kind=full", "student.lora=null"])
    assert full.student.kind == "full" and full.student.lora is None


def test_apply_overrides_copies_and_creates_blocks():
    data = {"train": {"max_steps": 3}, "student": None}
    out = apply_overrides(data, ["train.max_steps=4", "export.merged=true", "student.lora.rank=2"])
    assert out == {"train": {"max_steps": 4}, "export": {"merged": True}, "student": {"lora": {"rank": 2}}}
    assert data == {"train": {"max_steps": 3}, "student": None}


def test_override_of_nonexistent_key_fails_with_did_you_mean(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["train.max_stesp=2", "trian.seed=1", "optim.lr=-1"])
    by_path = {i.path: i for i in info.value.issues}
    assert sorted(by_path) == ["optim.lr", "train.max_stesp", "trian"]
    assert by_path["train.max_stesp"].hint.startswith("Did you mean 'max_steps'?")
    assert "'train.max_stesp=2'" in by_path["train.max_stesp"].hint  # names the override that caused it
    assert by_path["trian"].hint.startswith("Did you mean 'train'?")
    assert str(recipe_file) in str(info.value)


def test_override_through_a_scalar_fails(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["train.max_steps.value=3"])
    [err] = info.value.issues
    assert err.path == "train.max_steps" and err.value == 20 and "is not a block" in err.message


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "train..max_steps=3", "train.sample_steps=[1,2"])
def test_malformed_overrides(recipe_file, override):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, [override])
    assert repr(override) in str(info.value)


def test_missing_file_and_unknown_name(tmp_path, monkeypatch):
    write(tmp_path / "shipped" / "quickstart" / "digits_lcm.yaml", "description: x\n")
    monkeypatch.setattr(load_module, "recipes_dir", lambda: tmp_path / "shipped")
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart/digits_lmc")
    message = str(info.value)
    assert "'quickstart/digits_lmc' not found" in message and "Did you mean 'quickstart/digits_lcm'?" in message
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)


def test_shipped_name_resolves_in_the_recipes_dir(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    write(shipped / "quickstart" / "digits_x.yaml", RECIPE)
    write(shipped / "lcm" / "sd15_lcm_lora.yaml", RECIPE.replace("fewstep:digits-vp", "tiny:sd15"))
    (shipped / "notes.txt").write_text("not a recipe")
    monkeypatch.setattr(load_module, "recipes_dir", lambda: shipped)
    assert list_recipes() == ["lcm/sd15_lcm_lora", "quickstart/digits_x"]
    assert resolve_recipe("quickstart/digits_x") == shipped / "quickstart" / "digits_x.yaml"
    assert resolve_recipe("lcm/sd15_lcm_lora.yaml") == shipped / "lcm" / "sd15_lcm_lora.yaml"
    assert load_recipe("lcm/sd15_lcm_lora", ["train.max_steps=1"]).teacher.pretrained == "tiny:sd15"
    assert recipe_description(shipped / "lcm" / "sd15_lcm_lora.yaml") == "A small recipe for tests"
    assert list_recipes(tmp_path / "nowhere") == []


def test_recipes_dir_is_the_repository_recipes():
    assert recipes_dir().resolve() == (REPO / "recipes").resolve()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "teacher:\n  pretrained: x\n  dtype: [float32\noutput_dir: y\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:4:") and "invalid YAML" in str(info.value)


def test_duplicate_keys_are_an_error(tmp_path):
    path = write(tmp_path / "dup.yaml", "train:\n  max_steps: 1\n  max_steps: 2\n")
    with pytest.raises(RecipeError, match=r"dup.yaml:3:3: invalid YAML: duplicate key 'max_steps'"):
        load_recipe(path)


@pytest.mark.parametrize(("text", "match"), [("", "is empty"), ("- a\n- b\n", "holds a list")])
def test_empty_or_non_mapping_file(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_dump_round_trips(recipe_file, tmp_path):
    recipe = load_recipe(
        recipe_file,
        [
            "optim.betas=[0.8, 0.95]",
            "train.sample_steps=[1, 8]",
            "optim.eps=1e-12",
            "student.lora.alpha=16",
            "optim.group_lr={fake_score: 2e-4}",
        ],
    )
    text = dump_recipe(recipe)
    assert "mixed_precision: 'no'" in text and "name: _test_objective_load" in text
    again = load_recipe(write(tmp_path / "resolved.yaml", text))
    assert again == recipe and again.model_dump() == recipe.model_dump()
    assert dump_recipe(again) == text
    assert again.optim.betas == (0.8, 0.95) and again.optim.eps == 1e-12 and again.student.lora.alpha == 16.0
