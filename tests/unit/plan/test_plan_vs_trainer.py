"""``fewstep plan``'s per-rank static memory against what the real trainer holds: two CPU processes (gloo) train the
shipped digits teacher for 2 steps, replicated (DDP) or sharded (``train.fsdp``, full shard), and ``run_summary.json``
lists each rank's frozen weights, trainable weights, AdamW state and EMA shadows (its local shards when sharded).
Each part must be within 20% of the plan's part for the same layout, and the sharded ranks must add up to the whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fewstep.config import load_recipe
from fewstep.plan import layout_by_name, plan_recipe
from tests.helpers import launch_two

LORA_DMD2 = {  # one frozen base carrying the student's and the fake score's LoRA adapters, and the GAN head
    "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
    "student": {"kind": "lora", "lora": {"rank": 4, "alpha": 4}},
    "objective": {
        "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
        "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 0,
    },
}  # fmt: skip
FULL_DIFFUSION = {  # a full student next to the frozen teacher
    "teacher": {"pretrained": "fewstep:digits-vp"},
    "student": {"kind": "full"},
    "objective": {"name": "diffusion"},
}
# the trainer's name for each part -> the planner's
PARTS = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights", "optimizer": "AdamW state",
         "ema": "EMA"}  # fmt: skip


def recipe(path: Path, roles: dict[str, Any], fsdp: bool) -> Path:
    data = {
        **roles,
        "data": {"source": "digits", "batch_size": 4},
        "train": {"max_steps": 2, "checkpoint_every": 100, "sample_every": None, "progress": False, "ema_decay": 0.9},
        "output_dir": str(path.with_suffix("")),
    }
    if fsdp:
        data["train"]["fsdp"] = {"enabled": True}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("roles", "fsdp"),
    [(LORA_DMD2, False), (LORA_DMD2, True), (FULL_DIFFUSION, True)],
    ids=["lora-dmd2-ddp", "lora-dmd2-fsdp2-full-shard", "full-diffusion-fsdp2-full-shard"],
)
def test_static_plan_matches_the_trainers_state_per_rank(roles, fsdp, tmp_path):
    path = recipe(tmp_path / "run.yaml", roles, fsdp)
    summary = launch_two(path, tmp_path)
    measured = summary["state_bytes_per_rank"]
    assert summary["world_size"] == 2 and len(measured) == 2

    plan = plan_recipe(load_recipe(path), world_size=2, device="cpu")
    predicted = layout_by_name(plan, "fsdp2_full_shard" if fsdp else "ddp").persistent
    whole = layout_by_name(plan, "ddp").persistent
    for ours, theirs in PARTS.items():
        assert predicted[theirs] > 0
        for rank in measured:
            assert abs(predicted[theirs] - rank[ours]) <= 0.2 * rank[ours], (ours, predicted, measured)
        # sharded or not, the ranks together hold the whole state once per copy
        together = sum(rank[ours] for rank in measured)
        assert abs(together - (1 if fsdp else 2) * whole[theirs]) <= 0.01 * together, (ours, whole, measured)
    if fsdp:  # each rank holds about half
        for rank in measured:
            assert all(abs(rank[ours] - whole[theirs] / 2) <= 0.01 * rank[ours] for ours, theirs in PARTS.items())
