"""An interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.train.checkpoint import checkpoint_dir, latest_checkpoint, load_trainable_weights
from fewstep.train.loop import train

STUDENTS = {"full": {"kind": "full"}, "lora": {"kind": "lora", "lora": {"rank": 4}}}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _optimizer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / "optimizers" / "student.pt", weights_only=True)
    out = {}
    for pid, s in state["optimizer"]["state"].items():
        for key, value in s.items():
            out[f"{pid}.{key}"] = torch.as_tensor(value)
    out["scheduler.last_epoch"] = torch.tensor(state["scheduler"]["last_epoch"])
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_is_exact(kind, make_recipe, tmp_path):
    # lr warmup (4 steps) spans the interruption at step 4; accumulation and cond dropout draw from the RNG.
    changes = {
        "student": STUDENTS[kind],
        "train": {"max_steps": 8, "checkpoint_every": 4, "gradient_accumulation_steps": 2, "ema_decay": 0.9},
    }
    straight = train(make_recipe(tmp_path / "straight", **changes))

    first = {**changes, "train": {**changes["train"], "max_steps": 4}}
    interrupted = train(make_recipe(tmp_path / "resumed", **first))
    assert latest_checkpoint(interrupted) == checkpoint_dir(interrupted, 4)
    resumed = train(make_recipe(tmp_path / "resumed", **changes))
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(checkpoint_dir(resumed, 4)) and summary["step"] == 8

    a, b = checkpoint_dir(straight, 8), checkpoint_dir(resumed, 8)
    weights_a, weights_b = load_trainable_weights(a)["student"], load_trainable_weights(b)["student"]
    assert _max_diff(weights_a, weights_b) == 0.0
    assert _max_diff(load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")) == 0.0
    assert _max_diff(_optimizer_tensors(a), _optimizer_tensors(b)) == 0.0
    meta_a, meta_b = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert meta_a["data_position"] == meta_b["data_position"] == 8 * 2 * 8  # steps × accumulation × batch

    # The test is not vacuous: the weights moved between the two checkpoints, and only adapters are saved for LoRA.
    at_4 = load_trainable_weights(checkpoint_dir(straight, 4))["student"]
    assert _max_diff(at_4, weights_a) > 1e-4
    if kind == "lora":
        assert all("lora_" in k for k in weights_a)
    else:
        assert any(k.endswith("conv_in.weight") for k in weights_a)


def test_resume_is_exact_with_an_auxiliary_module(make_recipe, tmp_path):
    """sCM's adaptive weighting is trained by the student's optimizer, checkpointed (with its EMA shadow) under
    ``auxiliary/`` and resumed exactly; the student's own weights file and EMA never hold it."""
    changes = {
        "objective": {"name": "scm", "tangent_warmup_steps": 2, "adaptive_weighting": True},
        "student": STUDENTS["lora"],
        "data": {"batch_size": 4},
        "train": {"max_steps": 4, "checkpoint_every": 2, "ema_decay": 0.9},
    }
    straight = train(make_recipe(tmp_path / "straight", **changes))
    train(make_recipe(tmp_path / "resumed", **{**changes, "train": {**changes["train"], "max_steps": 2}}))
    resumed = train(make_recipe(tmp_path / "resumed", **changes))

    a, b = checkpoint_dir(straight, 4), checkpoint_dir(resumed, 4)
    weights = load_file(a / "auxiliary" / "student.safetensors")
    assert sorted(weights) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert _max_diff(weights, load_file(b / "auxiliary" / "student.safetensors")) == 0.0
    assert (
        _max_diff(load_file(a / "auxiliary" / "ema.safetensors"), load_file(b / "auxiliary" / "ema.safetensors")) == 0
    )
    assert _max_diff(load_trainable_weights(a)["student"], load_trainable_weights(b)["student"]) == 0.0
    assert _max_diff(_optimizer_tensors(a), _optimizer_tensors(b)) == 0.0
    assert all("lora_" in k for k in load_trainable_weights(a)["student"])  # the weighting is not the student's
    assert all(k.startswith("student/") and "lora_" in k for k in load_file(a / "ema.safetensors"))

    # One optimizer trains both: its state covers the LoRA and the weighting, which moved from its zero init.
    state = torch.load(a / "optimizers" / "student.pt", weights_only=True)["optimizer"]
    assert len(state["state"]) == len(load_trainable_weights(a)["student"]) + len(weights)
    assert float(weights["net.2.weight"].abs().max()) > 0
