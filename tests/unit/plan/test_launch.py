"""The launch commands ``fewstep plan`` prints for each layout shard the way the layout says: the accelerate FSDP2
flags, the ``train.fsdp`` recipe keys and the shipped accelerate config give the trainer the same ``FSDPLayout``
(``fewstep.train.sharding.fsdp_layout``); every objective, JVP ones included, gets the sharded layouts."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from fewstep.config import load_recipe
from fewstep.plan import layout_by_name, plan_recipe
from fewstep.plan.report import config_command, fsdp_overrides, launch_command, override_command, render_text
from fewstep.train.sharding import FSDPLayout, fsdp_layout
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[3]
RECIPE = "bench/digits_flow_scm"  # sCM: a JVP through the student, and an auxiliary weighting network


def accelerate_layout(command: str) -> tuple[FSDPLayout | None, list[str]]:
    """What the trainer's processes of an ``accelerate launch`` command shard with (the launcher's options and
    environment, as ``accelerate launch`` hands them over on GPUs), and the ``fewstep train`` arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    words = shlex.split(command.replace("$NODE_RANK", "0").replace("$MASTER_ADDR", "127.0.0.1"))
    assert words[:2] == ["accelerate", "launch"], command
    words = [str(ROOT / w) if w.startswith("recipes/accelerate/") else w for w in words[2:]]
    args = launch_command_parser().parse_args(["--main_process_port", str(free_port()), *words])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    ours = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_", "PARALLELISM_CONFIG_"))}
    gpu = torch.device("cuda")  # what these launches run on (the trainer reads the device for offload)
    accelerator = SimpleNamespace(
        num_processes=args.num_processes, distributed_type="MULTI_GPU", state=None, device=gpu
    )
    if args.use_fsdp:
        with mock.patch.dict(os.environ, ours):
            plugin = FullyShardedDataParallelPlugin()
            mesh = ParallelismConfig() if env.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true" else None
        accelerator = SimpleNamespace(num_processes=args.num_processes, distributed_type="FSDP", device=gpu,
                                      state=SimpleNamespace(fsdp_plugin=plugin), parallelism_config=mesh)  # fmt: skip
    recipe = load_recipe(args.training_script_args[1], args.training_script_args[2:])
    return fsdp_layout(recipe.train.fsdp, accelerator), args.training_script_args


@pytest.mark.parametrize("gpus", [2, 16])
def test_accelerate_flags_recipe_keys_and_shipped_configs_shard_alike(gpus, tmp_path):
    plan = plan_recipe(load_recipe(RECIPE, [f"output_dir={tmp_path}"]), world_size=gpus, gpus_per_node=8)
    assert {r.layout.strategy for r in plan.ranks} == (
        {"ddp", "fsdp2_full_shard", "fsdp2_shard_grad_op"} | ({"hsdp"} if gpus > 8 else set())
    )  # a JVP objective gets every sharded layout
    configs = 0
    for rank in plan.ranks:
        layout, train = accelerate_layout(launch_command(plan, rank, RECIPE, []))
        if rank.layout.strategy == "ddp":
            assert layout is None and override_command(plan, rank, RECIPE, []) is None
            continue
        expected = FSDPLayout(
            reshard_after_forward=rank.layout.strategy != "fsdp2_shard_grad_op",
            replicate=gpus // 8 if rank.layout.strategy == "hsdp" else 1,
            cpu_offload=rank.layout.offload,
            activation_checkpointing=rank.layout.checkpointing,
        )
        assert layout == expected, (rank.layout.name, launch_command(plan, rank, RECIPE, []))
        keys, keys_train = accelerate_layout(override_command(plan, rank, RECIPE, []))
        assert keys == expected and keys_train[-len(fsdp_overrides(plan, rank)) :] == fsdp_overrides(plan, rank)
        shipped = config_command(plan, rank, RECIPE, [])
        if shipped is not None:
            configs += 1
            assert accelerate_layout(shipped)[0] == expected, shipped
    assert configs == (5 if gpus > 8 else 4)  # full shard (+ckpt, +offload), shard-grad-op (, hybrid)


def test_a_sharded_layout_prints_every_way_to_launch_it(tmp_path):
    plan = plan_recipe(load_recipe(RECIPE, [f"output_dir={tmp_path}"]), world_size=2)
    plan.gpu_memory_bytes = int(layout_by_name(plan, "fsdp2_full_shard").total_bytes / (1 - plan.headroom)) + 1
    assert plan.recommended is not None and plan.recommended.layout.strategy != "ddp"  # DDP needs more than that
    text = render_text(plan, RECIPE, [])
    assert "--use_fsdp --fsdp_version 2" in text
    assert f"--multi_gpu -m fewstep train {RECIPE} train.fsdp.enabled=true" in text
    assert "--config_file recipes/accelerate/fsdp2_" in text
    assert "refused" not in text
