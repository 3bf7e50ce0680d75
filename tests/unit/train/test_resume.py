"""An interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one (DESIGN §5)."""

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
    state = torch.load(ckpt / "optimizers" / "student.pt", weights_only=False)
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
