"""The FSDP2 full-shard layout's per-rank static bytes vs a real 2-process CPU (gloo) ``fully_shard`` run: each
rank's local shards of parameters, gradients and AdamW state, within 5% of the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fewstep.config.load import validate_recipe
from fewstep.plan import layout_by_name, plan_recipe

WORKER = Path(__file__).with_name("fsdp_shard_worker.py")
ROOT = Path(__file__).resolve().parents[3]


def test_full_shard_matches_a_real_two_process_fully_shard(tmp_path):
    recipe = validate_recipe({
        "teacher": {"pretrained": "fewstep:digits-vp"}, "student": {"kind": "full"},
        "objective": {"name": "diffusion"}, "data": {"source": "digits", "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    rank = layout_by_name(plan_recipe(recipe, world_size=2, device="cpu"), "fsdp2_full_shard")
    predicted = {"params": rank.persistent["trainable weights"], "grads": rank.step["gradients"],
                 "optimizer": rank.persistent["AdamW state"]}  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for key, value in predicted.items():
        for measured in ranks:
            assert abs(value - measured[key]) <= 0.05 * measured[key], (key, value, ranks)
