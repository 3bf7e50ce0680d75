"""The shipped accelerate configs (recipes/accelerate/) go through accelerate's own launcher as written, and
``fewstep validate`` reports each problem of a launch config in one line: unknown keys, FSDP1, DeepSpeed without its
package, precision / accumulation / clipping against the recipe, hybrid meshes, machines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

from fewstep.cli.main import main
from fewstep.config import list_recipes, load_recipe, resolve_recipe
from fewstep.config.errors import RecipeError
from fewstep.config.launch import (
    describe_launch_config,
    is_launch_config,
    launch_config_issues,
    launch_configs_dir,
    list_launch_configs,
    resolve_launch_config,
)
from tests.helpers import digits_lora_recipe, free_port

SHIPPED = {  # name -> what accelerate's launcher must make of it
    "ddp": {"kind": "multi_gpu"},
    "multi_node": {"kind": "multi_gpu", "machines": 2},
    "fsdp2_full_shard": {"kind": "fsdp", "reshard": True, "offload": False, "checkpointing": False},
    "fsdp2_shard_grad_op": {"kind": "fsdp", "reshard": False, "offload": False, "checkpointing": False},
    "fsdp2_offload": {"kind": "fsdp", "reshard": True, "offload": True, "checkpointing": False},
    "fsdp2_full_shard_ac": {"kind": "fsdp", "reshard": True, "offload": False, "checkpointing": True},
    "fsdp2_hybrid": {"kind": "fsdp", "reshard": True, "offload": False, "checkpointing": False, "mesh": (2, 4)},
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def launcher_environment(path: Path) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file path -m fewstep train R`` does before it starts the processes: the
    config merged into its options (``_validate_launch_command``), then the environment each process gets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(path), "--main_process_port", str(free_port()), "-m", "fewstep", "train", "R"]
    args = launch_command_parser().parse_args(["--main_process_ip", "127.0.0.1", *argv])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_accelerate_launch_takes_each_shipped_config_as_written(name):
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    expected = SHIPPED[name]
    args, env = launcher_environment(resolve_launch_config(name))
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.num_machines == expected.get("machines", 1)
    assert args.num_processes == 8 * args.num_machines
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == tuple(
        expected["kind"] == kind for kind in ("multi_gpu", "fsdp", "deepspeed")
    )
    ours = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_", "PARALLELISM_CONFIG_"))}
    with mock.patch.dict(os.environ, ours):  # the plugins read what the launcher hands each process
        if expected["kind"] == "fsdp":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2
            assert plugin.reshard_after_forward is expected["reshard"]
            assert type(plugin.cpu_offload).__name__ == ("CPUOffloadPolicy" if expected["offload"] else "OffloadPolicy")
            assert plugin.activation_checkpointing is expected["checkpointing"]
            assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
            assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
            mesh = expected.get("mesh")
            assert (env.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true") is bool(mesh)
            if mesh:
                sizes = ParallelismConfig()
                assert (sizes.dp_replicate_size, sizes.dp_shard_size) == mesh
                assert sizes.total_size == args.num_processes
        if expected["kind"] == "deepspeed":
            plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == expected["stage"]
            assert (plugin.offload_optimizer_device, plugin.offload_param_device) == expected["offload"]
            assert plugin.gradient_clipping == 1.0  # the recipes' default optim.grad_clip
            assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # the recipe's accumulation applies


def test_shipped_configs_are_listed_apart_from_recipes():
    files = sorted(p.stem for p in launch_configs_dir().glob("*.yaml"))
    assert list_launch_configs() == files == sorted(SHIPPED)
    assert not [name for name in list_recipes() if name.startswith("accelerate/")]
    assert (
        resolve_launch_config("accelerate/ddp.yaml")
        == resolve_launch_config("ddp")
        == launch_configs_dir() / "ddp.yaml"
    )
    with pytest.raises(RecipeError, match=r"'fsdp2_ful_shard' not found.*Did you mean 'fsdp2_full_shard'\?"):
        resolve_launch_config("fsdp2_ful_shard")
    assert is_launch_config(yaml.safe_load(resolve_launch_config("ddp").read_text()))
    assert not is_launch_config(digits_lora_recipe(Path("run")))


def test_shipped_configs_validate_against_a_bf16_recipe(tmp_path):
    recipe = load_recipe("quickstart/digits_lcm", ["train.mixed_precision=bf16", f"output_dir={tmp_path / 'run'}"])
    for name in SHIPPED:
        issues = [str(i) for i in launch_config_issues(resolve_launch_config(name), recipe, machine=HAS_DEEPSPEED)]
        if name == "multi_node":  # the one value left for the user to fill in
            assert len(issues) == 1 and issues[0].startswith("main_process_ip: is not set"), issues
        else:
            assert issues == [], (name, issues)
    assert describe_launch_config(resolve_launch_config("fsdp2_hybrid")) == (
        "FSDP2 full shard, hybrid 2 replicas x 4 shards, 8 processes on 1 machine, mixed precision bf16"
    )


FSDP2 = {"distributed_type": "FSDP", "num_processes": 8, "fsdp_config": {"fsdp_version": 2}}
DS = {"distributed_type": "DEEPSPEED", "num_processes": 8, "deepspeed_config": {"zero_stage": 2}}
CASES = {  # name -> (config, the issue's key path, words it must hold)
    "unknown top-level key": ({**FSDP2, "num_machine": 2}, "num_machine", "Did you mean 'num_machines'?"),
    "unknown nested key": (
        {**FSDP2, "fsdp_config": {"fsdp_version": 2, "fsdp_stat_dict_type": "SHARDED_STATE_DICT"}},
        "fsdp_config.fsdp_stat_dict_type",
        "unknown key (accelerate launch would ignore it). Did you mean 'fsdp_state_dict_type'?",
    ),
    "unknown parallelism key": (
        {**FSDP2, "parallelism_config": {"parallelism_config_dp_shards": 8}},
        "parallelism_config.parallelism_config_dp_shards",
        "Did you mean 'parallelism_config_dp_shard_size'?",
    ),
    "FSDP1": ({**FSDP2, "fsdp_config": {"fsdp_version": 1}}, "fsdp_config.fsdp_version", "FSDP2 only"),
    "FSDP1 by default": (
        {**FSDP2, "fsdp_config": {"fsdp_offload_params": True}},
        "fsdp_config.fsdp_version",
        "1 is accelerate's default when the key is absent",
    ),
    "FSDP1 strategy name": (
        {**FSDP2, "fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": "FULL_SHARD"}},
        "fsdp_config.fsdp_reshard_after_forward",
        "takes true or false in FSDP2",
    ),
    "FSDP1 state dict": (
        {**FSDP2, "fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "LOCAL_STATE_DICT"}},
        "fsdp_config.fsdp_state_dict_type",
        "allowed: SHARDED_STATE_DICT, FULL_STATE_DICT",
    ),
    "DeepSpeed on CPUs": ({**DS, "use_cpu": True}, "use_cpu", "accelerate does not set up DEEPSPEED on CPUs"),
    "FSDP on CPUs": ({**FSDP2, "use_cpu": True}, "use_cpu", "accelerate does not set up FSDP on CPUs"),
    "unquoted no": ({**FSDP2, "mixed_precision": False}, "mixed_precision", "Quote it: mixed_precision: 'no'"),
    "precision against the recipe": (
        {**FSDP2, "mixed_precision": "bf16"},
        "mixed_precision",
        "differs from the recipe's train.mixed_precision 'no'",
    ),
    "accumulation against the recipe": (
        {**DS, "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 4}},
        "deepspeed_config.gradient_accumulation_steps",
        "replaces the recipe's train.gradient_accumulation_steps (1)",
    ),
    "clipping against the recipe": (
        {**DS, "deepspeed_config": {"zero_stage": 2, "gradient_clipping": 0.5}},
        "deepspeed_config.gradient_clipping",
        "not at the recipe's optim.grad_clip (1.0)",
    ),
    "shard size not dividing the processes": (
        {**FSDP2, "num_processes": 6, "parallelism_config": {"parallelism_config_dp_shard_size": 4}},
        "parallelism_config.parallelism_config_dp_shard_size",
        "does not divide num_processes (6)",
    ),
    "mesh not covering the processes": (
        {**FSDP2, "num_processes": 16, "parallelism_config": {"parallelism_config_dp_shard_size": 4}},
        "parallelism_config.parallelism_config_dp_replicate_size",
        "times the shard group size (4) is 4, but num_processes is 16 (accelerate needs them equal); got 1; allowed: 4",
    ),
    "tensor parallelism": (
        {**FSDP2, "parallelism_config": {"parallelism_config_dp_shard_size": 4, "parallelism_config_tp_size": 2}},
        "parallelism_config.parallelism_config_tp_size",
        "fewstep trains data-parallel only",
    ),
    "mesh without FSDP2": (
        {
            "distributed_type": "MULTI_GPU",
            "num_processes": 8,
            "parallelism_config": {"parallelism_config_dp_shard_size": 8},
        },
        "parallelism_config",
        "needs distributed_type: FSDP with fsdp_version: 2",
    ),
    "machines without an address": ({**FSDP2, "num_machines": 2}, "main_process_ip", "num_machines is 2"),
    "processes not splitting over machines": (
        {**FSDP2, "num_processes": 9, "num_machines": 2, "main_process_ip": "10.0.0.1"},
        "num_processes",
        "must split evenly",
    ),
    "machine rank out of range": (
        {**FSDP2, "num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"},
        "machine_rank",
        "should be 0 .. 1",
    ),
    "one process for MULTI_GPU": ({"distributed_type": "MULTI_GPU", "num_processes": 1}, "num_processes", "at least 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_problem_is_one_issue_at_its_key(case, tmp_path):
    config, path, words = CASES[case]
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    recipe = load_recipe("quickstart/digits_lcm")  # train.mixed_precision no, accumulation 1, grad_clip 1.0
    issues = launch_config_issues(file, recipe, machine=False)
    assert [i.path for i in issues] == [path], [str(i) for i in issues]
    assert words in str(issues[0])
    assert launch_config_issues(file, machine=False) == ([] if "recipe" in case else issues)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here")
def test_deepspeed_without_its_package_names_the_install_command(tmp_path):
    file = tmp_path / "zero2.yaml"
    file.write_text(yaml.safe_dump(DS))
    (issue,) = launch_config_issues(file)
    assert issue.path == "distributed_type"
    assert "needs the deepspeed package" in str(issue) and "pip install 'fewstep[deepspeed]'" in str(issue)
    assert launch_config_issues(file, machine=False) == []  # --no-files: meant for another machine


def test_validate_verb_checks_a_recipe_with_its_launch_config(tmp_path, capsys):
    recipe = ["quickstart/digits_lcm", f"output_dir={tmp_path / 'run'}"]
    assert main(["validate", *recipe, "--accelerate-config", "fsdp2_full_shard", "train.mixed_precision=bf16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("valid: ") and "digits_lcm.yaml (objective lcm" in out[0]
    assert out[1] == (
        f"valid: accelerate config {launch_configs_dir() / 'fsdp2_full_shard.yaml'} "
        "(FSDP2 full shard, 8 processes on 1 machine, mixed precision bf16)"
    )

    assert main(["validate", *recipe, "--accelerate-config", "fsdp2_full_shard", "train.resume=/no/such/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 error in recipe ") and "  - train.resume: is neither auto" in err
    assert "1 error in accelerate config " in err and "  - mixed_precision: differs from the recipe's" in err
    assert "Traceback" not in err


def test_validate_verb_checks_an_accelerate_config_alone(tmp_path, capsys):
    assert main(["validate", "fsdp2_hybrid"]) == 0
    assert "(FSDP2 full shard, hybrid 2 replicas x 4 shards" in capsys.readouterr().out
    file = tmp_path / "fsdp1.yaml"
    file.write_text(yaml.safe_dump({**FSDP2, "fsdp_config": {"fsdp_version": 1}}))
    assert main(["validate", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: 1 error in accelerate config {file}:\n  - fsdp_config.fsdp_version: fewstep supports"
    )
    assert main(["validate", str(file), "train.max_steps=2"]) == 2
    assert "is an accelerate config, not a recipe: give the recipe first" in capsys.readouterr().err
    recipe = str(resolve_recipe("quickstart/digits_lcm"))
    assert main(["validate", "quickstart/digits_lcm", "--accelerate-config", recipe]) == 2
    assert "is a fewstep recipe, not an accelerate config" in capsys.readouterr().err


def test_the_distributed_doc_names_every_shipped_config_and_only_those():
    import re

    text = (Path(__file__).resolve().parents[3] / "docs" / "distributed.md").read_text()
    in_table = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, re.M))
    assert {name for pair in in_table for name in pair if name} == set(SHIPPED)
    named = set(re.findall(r"recipes/accelerate/(\w+)\.yaml", text)) | set(
        re.findall(r"--accelerate-config (\w+)", text)
    )
    assert named and named <= set(SHIPPED)
    recipes = set(re.findall(r"fewstep (?:train|validate) (\w+/\w+)", text))
    assert {"dmd/sdxl_dmd2_lora", "bench/digits_dmd2"} <= recipes
    for recipe in recipes:
        load_recipe(recipe)  # the recipe the examples launch exists
