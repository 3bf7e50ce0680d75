"""The recipe schema: defaults, strict keys, types, choices, cross-field checks and errors collected at once."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep.config import Recipe, RecipeError, validate_recipe
from fewstep.config.errors import MISSING, issue, issues_from_validation, raise_issues
from fewstep.config.schema import LoraBlock, OptimConfig, TrainConfig
from fewstep.objectives import OBJECTIVES


class _TestObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["_test_objective"] = "_test_objective"
    w_min: float = Field(3.0, ge=0.0)
    w_max: float = Field(15.0, ge=0.0)
    loss_type: Literal["l2", "huber"] = "l2"

    @model_validator(mode="after")
    def _range(self) -> _TestObjectiveConfig:
        if self.w_max < self.w_min:
            raise_issues([issue("w_max", f"should be >= w_min ({self.w_min})", self.w_max)])
        return self


class _TestObjective:
    Config = _TestObjectiveConfig


@pytest.fixture(autouse=True)
def test_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES._items, "_test_objective", _TestObjective)


MINIMAL = {
    "teacher": {"pretrained": "tiny:sd15"},
    "objective": {"name": "_test_objective"},
    "data": {"source": "digits"},
    "output_dir": "runs/test",
}


def with_value(path: str, value: object) -> dict:
    data = copy.deepcopy(MINIMAL)
    *blocks, key = path.split(".")
    node = data
    for block in blocks:
        node = node.setdefault(block, {})
    node[key] = value
    return data


def errors_of(data: dict) -> list:
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    return info.value.issues


def only_error(data: dict):
    issues = errors_of(data)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


def test_minimal_recipe_fills_every_default():
    recipe = validate_recipe(MINIMAL)
    assert isinstance(recipe.objective, _TestObjectiveConfig)
    assert recipe.objective.w_min == 3.0 and recipe.objective.loss_type == "l2"
    teacher = recipe.teacher
    assert (teacher.family, teacher.dtype, teacher.guidance_scale, teacher.revision) == ("auto", "float32", 1.0, None)
    assert recipe.student.kind == "lora" and recipe.student.lora == LoraBlock(rank=64, alpha=None, dropout=0.0)
    assert recipe.optim.betas == (0.9, 0.999) and recipe.optim.lr_scheduler == "constant_with_warmup"
    assert recipe.train.max_steps == 1000 and recipe.train.sample_steps == [1, 2, 4] and recipe.train.resume == "auto"
    assert recipe.train.mixed_precision == "no" and recipe.train.ema_decay is None
    assert recipe.eval.steps == [1, 2, 4] and recipe.eval.every_steps is None
    assert (recipe.export.lora, recipe.export.merged, recipe.export.kohya) == (True, False, False)
    assert recipe.description == "" and recipe.output_dir == "runs/test"


@pytest.mark.parametrize(
    ("block", "typo", "suggestion"),
    [
        ("", "trian", "train"),
        ("teacher", "dtyp", "dtype"),
        ("student", "gradient_checkpoint", "gradient_checkpointing"),
        ("student.lora", "rnak", "rank"),
        ("data", "batchsize", "batch_size"),
        ("optim", "weight_decy", "weight_decay"),
        ("train", "max_stesp", "max_steps"),
        ("eval", "num_sample", "num_samples"),
        ("export", "mergd", "merged"),
        ("objective", "w_mni", "w_min"),
    ],
)
def test_unknown_keys_fail_in_every_block_with_did_you_mean(block, typo, suggestion):
    path = f"{block}.{typo}" if block else typo
    err = only_error(with_value(path, 7))
    assert err.path == path and err.message == "unknown key" and err.value == 7
    assert suggestion in err.allowed.split(", ")  # the allowed keys of that block are listed
    assert err.hint == f"Did you mean {suggestion!r}?"


def test_unknown_key_without_close_match_lists_allowed_keys():
    err = only_error(with_value("export.zzz", True))
    assert err.allowed == "kohya, lora, merged" and "Did you mean" not in err.hint


@pytest.mark.parametrize(
    ("path", "value", "allowed"),
    [
        ("train.max_steps", "many", "an integer"),
        ("teacher.guidance_scale", [1.0], "a number"),
        ("train.progress", "maybe", "true or false"),
        ("teacher.pretrained", 123, "a string"),
        ("train.sample_steps", 4, "a list of integers"),
        ("optim.betas", "0.9", "a list of 2 numbers"),
    ],
)
def test_wrong_types_name_the_expected_type(path, value, allowed):
    err = only_error(with_value(path, value))
    assert (err.path, err.value, err.allowed) == (path, value, allowed)


def test_a_scalar_where_a_block_belongs():
    err = only_error(with_value("student", "lora"))
    assert err.path == "student" and "block" in err.message and "kind" in err.allowed


@pytest.mark.parametrize(
    ("path", "value", "choices"),
    [
        ("train.mixed_precision", "fp8", "'no', 'fp16', 'bf16'"),
        ("teacher.dtype", "fp32", "'float32', 'bfloat16', 'float16'"),
        (
            "teacher.family",
            "sd5",
            "'auto', 'sd15', 'sdxl', 'sd3', 'flux', 'unet2d', 'sd35', 'qwen_image', 'wan21', 'wan21_i2v', 'wan22', "
            "'wan22_ti2v', 'ltx', 'pixart_sigma', 'sana', 'wan_class', 'cogvideox', 'flux2', 'chroma', 'zimage', "
            "'hunyuan15', 'hunyuan15_i2v'",
        ),
        ("optim.lr_scheduler", "cosin", "'constant', 'constant_with_warmup', 'linear', 'cosine'"),
        (
            "data.source",
            "folder",
            "'cache', 'digits', 'fashion_mnist', 'image_folder', 'moving_digits', 'pairs', 'prompts', 'tensors', "
            "'webdataset'",
        ),
        ("objective.loss_type", "l1", "'l2', 'huber'"),
    ],
)
def test_bad_literal_lists_the_choices(path, value, choices):
    err = only_error(with_value(path, value))
    assert (err.path, err.value, err.allowed) == (path, value, choices)
    assert str(err) == f"{path}: not an allowed value; got {value!r}; allowed: {choices}"


@pytest.mark.parametrize(
    ("path", "value", "error_path"),
    [
        ("optim.lr", 0.0, "optim.lr"),
        ("optim.lr", -1e-4, "optim.lr"),
        ("optim.eps", 0, "optim.eps"),
        ("optim.betas", [0.9, 1.0], "optim.betas[1]"),
        ("optim.betas", [0.9], "optim.betas[1]"),
        ("optim.group_lr", {"student": -1.0}, "optim.group_lr.student"),
        ("optim.grad_clip", 0, "optim.grad_clip"),
        ("train.max_steps", 0, "train.max_steps"),
        ("train.gradient_accumulation_steps", -2, "train.gradient_accumulation_steps"),
        ("train.ema_decay", 1.0, "train.ema_decay"),
        ("train.ema_decay", 0.0, "train.ema_decay"),
        ("train.sample_steps", [1, 0], "train.sample_steps[1]"),
        ("train.sample_steps", [], "train.sample_steps"),
        ("train.keep_last", 0, "train.keep_last"),
        ("student.lora.rank", 0, "student.lora.rank"),
        ("student.lora.dropout", 1.0, "student.lora.dropout"),
        ("data.batch_size", 0, "data.batch_size"),
        ("data.num_workers", -1, "data.num_workers"),
        ("eval.steps", [0], "eval.steps[0]"),
        ("teacher.pretrained", "", "teacher.pretrained"),
        ("output_dir", "", "output_dir"),
    ],
)
def test_value_constraints(path, value, error_path):
    assert only_error(with_value(path, value)).path == error_path


def test_valid_edge_values():
    data = with_value("train.ema_decay", 0.999)
    data["optim"] = {"grad_clip": None, "group_lr": {"fake_score": 2e-4}, "betas": [0.0, 0.99]}
    recipe = validate_recipe(data)
    assert recipe.train.ema_decay == 0.999 and recipe.optim.grad_clip is None
    assert recipe.optim.group_lr == {"fake_score": 2e-4} and recipe.optim.betas == (0.0, 0.99)


def test_data_source_requirements():
    folder = {p.path: p for p in errors_of(with_value("data", {"source": "image_folder"}))}
    assert sorted(folder) == ["data.path", "data.resolution"]
    assert "metadata.jsonl" in folder["data.path"].hint
    assert only_error(with_value("data", {"source": "prompts"})).path == "data.prompts"
    both = only_error(with_value("data", {"source": "prompts", "prompts": ["a"], "path": "p.txt"}))
    assert both.path == "data.prompts" and "not both" in both.hint
    assert only_error(with_value("data", {"source": "digits", "path": "x"})).path == "data.path"
    ok = validate_recipe(with_value("data", {"source": "image_folder", "path": "imgs", "resolution": 64}))
    assert ok.data.path == "imgs" and ok.data.caption_column == "text"
    assert validate_recipe(with_value("data", {"source": "prompts", "prompts": ["a cat"]})).data.prompts == ["a cat"]
    assert validate_recipe(with_value("data", {"source": "prompts", "path": "p.txt"})).data.path == "p.txt"


def test_student_lora_block_follows_kind():
    full = validate_recipe(with_value("student", {"kind": "full"}))
    assert full.student.lora is None
    assert validate_recipe(with_value("student", {"kind": "lora", "lora": None})).student.lora == LoraBlock()
    err = only_error(with_value("student", {"kind": "full", "lora": {"rank": 8}}))
    assert err.path == "student.lora" and "student.lora=null" in err.hint


def test_constant_scheduler_rejects_warmup():
    err = only_error(with_value("optim", {"lr_scheduler": "constant", "warmup_steps": 100}))
    assert err.path == "optim.warmup_steps" and err.value == 100 and "constant_with_warmup" in err.hint
    assert OptimConfig(lr_scheduler="constant").warmup_steps == 0


def test_every_error_is_reported_at_once():
    data = copy.deepcopy(MINIMAL)
    data["teacher"]["dtype"] = "fp8"
    data["student"] = {"lora": {"rnak": 4}}
    data["objective"].update(w_min=-1.0, extra_knob=1)
    data["optim"] = {"lr": -1.0}
    data["train"] = {"max_steps": "lots", "mixed_precision": "fp4", "sample_steps": [1, -2]}
    data["colour"] = "blue"
    del data["output_dir"]
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, source="bad.yaml")
    paths = [i.path for i in info.value.issues]
    assert sorted(paths) == sorted(
        [
            "teacher.dtype",
            "student.lora.rnak",
            "objective.w_min",
            "objective.extra_knob",
            "optim.lr",
            "train.max_steps",
            "train.mixed_precision",
            "train.sample_steps[1]",
            "colour",
            "output_dir",
        ]
    )
    text = str(info.value)
    assert text.splitlines()[0] == "10 errors in recipe bad.yaml:"
    assert all(f"  - {p}: " in text for p in paths)
    missing = next(i for i in info.value.issues if i.path == "output_dir")
    assert missing.value is MISSING and missing.message == "required key is missing"


def test_objective_name_typo_suggests_the_registered_name():
    err = only_error(with_value("objective.name", "_test_objectiv"))
    assert (err.path, err.value, err.message) == ("objective.name", "_test_objectiv", "unknown objective")
    assert "'_test_objective'" in err.allowed and err.hint == "Did you mean '_test_objective'?"


def test_objective_block_missing_or_nameless():
    data = copy.deepcopy(MINIMAL)
    del data["objective"]
    err = only_error(data)
    assert err.path == "objective" and "'_test_objective'" in err.allowed
    err = only_error(with_value("objective", {"w_min": 1.0}))
    assert err.path == "objective.name" and err.message == "required key is missing"
    assert only_error(with_value("objective", "lcm")).path == "objective"


def test_objective_errors_carry_the_objective_prefix():
    issues = errors_of(with_value("objective", {"name": "_test_objective", "w_min": -1, "warp": 2}))
    by_path = {i.path: i for i in issues}
    assert sorted(by_path) == ["objective.w_min", "objective.warp"]
    assert by_path["objective.warp"].allowed == "loss_type, name, w_max, w_min"
    # A cross-field check inside the objective's own Config points at the offending key.
    err = only_error(with_value("objective", {"name": "_test_objective", "w_min": 5.0, "w_max": 1.0}))
    assert err.path == "objective.w_max" and err.value == 1.0


def test_objective_config_instance_is_accepted_as_is():
    config = _TestObjectiveConfig(w_min=1.0)
    recipe = validate_recipe({**MINIMAL, "objective": config})
    assert recipe.objective is config


def test_model_validate_gives_the_same_issues():
    data = with_value("train.max_steps", -3)
    with pytest.raises(ValidationError) as info:
        Recipe.model_validate(data)
    [err] = issues_from_validation(info.value, Recipe)
    assert err.path == "train.max_steps" and err.value == -3
    assert TrainConfig().max_steps == 1000


def test_shipped_lcm_objective_validates_into_its_config():
    lcm = pytest.importorskip("fewstep.objectives.consistency.lcm")
    recipe = validate_recipe(with_value("objective", {"name": "lcm"}))
    assert type(recipe.objective) is OBJECTIVES.get("lcm").Config and recipe.objective.name == "lcm"
    assert lcm is not None
    err = only_error(with_value("objective", {"name": "lcm", "w_mn": 1.0}))
    assert err.path == "objective.w_mn" and err.hint == "Did you mean 'w_min'?"
