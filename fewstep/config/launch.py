"""Accelerate launch configs (``accelerate launch --config_file FILE``): the shipped ones and the checks that refuse a
config fewstep cannot train with, or one that disagrees with the recipe, before a multi-GPU job starts.

The file is read by accelerate's own loader (``load_config_from_file``), which refuses unknown top-level keys. Its
nested blocks (``fsdp_config``, ``deepspeed_config``, ``parallelism_config``, ...) are copied by ``accelerate launch``
onto its own command-line options, and a key that is no option is dropped without a word: each nested key is checked
against the options of accelerate's launch parser. Then:

* FSDP must be FSDP2 (``fsdp_version: 2``, torch ``fully_shard``); FSDP1 is refused.
* DeepSpeed needs the ``deepspeed`` package; with ``use_cpu: true`` accelerate drops FSDP and DeepSpeed silently.
* the recipe decides precision, gradient accumulation and clipping (``train.mixed_precision`` is what fewstep
  passes to ``Accelerator``): a config that says otherwise is reported.
* a hybrid mesh (``parallelism_config``) multiplies out to ``num_processes``; fewstep trains data-parallel only.
* several machines need ``main_process_ip``, a ``machine_rank`` below ``num_machines`` and ``num_processes`` that
  splits evenly over them.

Shipped configs live in ``recipes/accelerate/`` (package data, ``LAUNCH_CONFIG_DIR``) and are named without it:
``fsdp2_full_shard``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from fewstep.config.errors import RecipeError, RecipeIssue, did_you_mean
from fewstep.config.load import LAUNCH_CONFIG_DIR, RECIPE_SUFFIX, recipes_dir

LEGACY_KEYS = ("fp16", "dynamo_backend")  # top-level keys accelerate's loader converts (fp16 -> mixed_precision)
# nested block -> (the prefix accelerate adds to its keys when they lack it, one of the block's launch options)
BLOCKS = {
    "fsdp_config": ("fsdp_", "fsdp_version"),
    "deepspeed_config": ("", "zero_stage"),
    "parallelism_config": ("", "parallelism_config_dp_shard_size"),
    "fp8_config": ("fp8_", "fp8_backend"),
    "dynamo_config": ("dynamo_", "dynamo_backend"),
    "megatron_lm_config": ("", "megatron_lm_tp_degree"),
    "mpirun_config": ("", "mpirun_hostfile"),
}
READ_BY_LAUNCHER = {"fsdp_config": ("fsdp_ignored_modules",)}  # read with getattr, no command-line option
DATA_PARALLEL_SIZES = ("dp_replicate_size", "dp_shard_size")
MODEL_PARALLEL_SIZES = ("tp_size", "cp_size", "sp_size")
DEEPSPEED_INSTALL = "pip install deepspeed (or pip install 'fewstep[deepspeed]')"


def launch_configs_dir() -> Path:
    """The shipped accelerate configs: ``<recipes>/accelerate``."""
    return recipes_dir() / LAUNCH_CONFIG_DIR


def list_launch_configs() -> list[str]:
    """Names of the shipped accelerate configs, e.g. ``["ddp", "fsdp2_full_shard", ..., "multi_node"]``."""
    base = launch_configs_dir()
    return sorted(p.stem for p in base.glob(f"*{RECIPE_SUFFIX}")) if base.is_dir() else []


def resolve_launch_config(path_or_name: str | os.PathLike[str]) -> Path:
    """A config file from a path (tried first) or a shipped name: ``fsdp2_full_shard``, ``accelerate/ddp.yaml``.

    Raises:
        RecipeError: neither a file nor a shipped name (the message lists the shipped names).
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = str(path_or_name).removesuffix(RECIPE_SUFFIX).removeprefix(f"{LAUNCH_CONFIG_DIR}/")
    shipped = launch_configs_dir() / f"{name}{RECIPE_SUFFIX}"
    if shipped.is_file():
        return shipped
    names = list_launch_configs()
    hint = did_you_mean(name, names) or "Give a path to an accelerate config file (written by `accelerate config`)."
    raise RecipeError(
        f"accelerate config {str(path_or_name)!r} not found: no such file and no shipped config of that name. {hint} "
        f"Shipped configs ({launch_configs_dir()}): {', '.join(names) or 'none'}."
    )


def is_launch_config(data: Any) -> bool:
    """Whether a parsed YAML file is an accelerate config rather than a recipe."""
    return (
        isinstance(data, dict)
        and bool({"distributed_type", "compute_environment"} & data.keys())
        and not {"teacher", "objective"} & data.keys()
    )


def launch_config_issues(
    path: str | os.PathLike[str], recipe: Any | None = None, machine: bool = True
) -> list[RecipeIssue]:
    """Every problem of the accelerate config at ``path``, with its key path in the file.

    Args:
        path: the config file (YAML or JSON, as accelerate reads it).
        recipe: the validated recipe it will launch; ``None`` checks the config alone.
        machine: also check what this machine must hold (the ``deepspeed`` package, a ``deepspeed_config_file``).
    """
    raw, issues = _read(Path(path))
    if raw is None:
        return issues
    if {"teacher", "objective"} & raw.keys():
        return [
            RecipeIssue(
                (), "this file is a fewstep recipe, not an accelerate config (distributed_type:, num_processes:, ...)"
            )
        ]
    issues += _key_issues(raw)
    if any(len(i.loc) == 1 for i in issues):
        return issues  # accelerate's loader refuses unknown top-level keys: nothing more can be read
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    try:
        config = load_config_from_file(str(path))
    except (ValueError, TypeError) as err:  # no distributed_type, a value outside accelerate's enums
        return [*issues, RecipeIssue((), f"accelerate cannot load it: {err}")]
    if not isinstance(config, ClusterConfig):
        return []  # a SageMaker config: accelerate launches it through AWS, nothing here applies
    issues += _precision_issues(config, raw, recipe)
    issues += _cpu_issues(config)
    issues += _fsdp_issues(config)
    issues += _deepspeed_issues(config, recipe, machine)
    issues += _parallelism_issues(config)
    issues += _machine_issues(config)
    return issues


def describe_launch_config(path: str | os.PathLike[str]) -> str:
    """One line on what a valid config launches: ``FSDP2 full shard, 8 processes on 1 machine, bf16``."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    kind = str(config.distributed_type.value)
    fsdp, ds = config.fsdp_config, config.deepspeed_config
    if kind == "FSDP":
        reshard = _flag(fsdp.get("fsdp_reshard_after_forward", True))
        kind = "FSDP2 " + ("full shard" if reshard else "shard-grad-op")
        sizes = config.parallelism_config
        if sizes:
            replicate, shard = (sizes.get(f"parallelism_config_{n}", 1) for n in DATA_PARALLEL_SIZES)
            kind += f", hybrid {replicate} replicas x {shard} shards"
        kind += ", CPU offload" if _flag(fsdp.get("fsdp_offload_params", False)) else ""
        kind += ", activation checkpointing" if _flag(fsdp.get("fsdp_activation_checkpointing", False)) else ""
    elif kind == "DEEPSPEED":
        kind = f"DeepSpeed ZeRO-{ds.get('zero_stage', '?')}"
        offloaded = [n for n in ("optimizer", "param") if str(ds.get(f"offload_{n}_device", "none")) != "none"]
        kind += f", {' and '.join(offloaded)} offload" if offloaded else ""
    elif kind in ("MULTI_GPU", "MULTI_CPU"):
        kind = "DDP" + (" on CPUs" if kind == "MULTI_CPU" or config.use_cpu else "")
    machines = config.num_machines
    processes = config.num_processes if config.num_processes and config.num_processes > 0 else "N"
    where = f"{processes} processes on {machines} machine{'s' if machines != 1 else ''}"
    return f"{kind}, {where}, mixed precision {config.mixed_precision or 'no'}"


def _read(path: Path) -> tuple[dict[str, Any] | None, list[RecipeIssue]]:
    """The raw mapping, read as accelerate reads it (``json.load``, or YAML 1.1 ``safe_load``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return None, [RecipeIssue((), f"cannot read accelerate config {str(path)!r}: {err.strerror or err}")]
    except UnicodeDecodeError:
        return None, [RecipeIssue((), f"accelerate config {str(path)!r} is not UTF-8 text: it is a YAML file")]
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        return None, [
            RecipeIssue((), f"accelerate config {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {err}")
        ]
    if not isinstance(data, dict):
        return None, [RecipeIssue((), "an accelerate config is a mapping (distributed_type:, num_processes:, ...)")]
    return data, []


@functools.cache
def _launch_options() -> dict[str, set[str]]:
    """Each nested block's accepted keys: the options of accelerate's launch parser in the block's argument group."""
    from accelerate.commands.launch import launch_command_parser

    groups = [{a.dest for a in group._group_actions} for group in launch_command_parser()._action_groups]
    options: dict[str, set[str]] = {}
    for block, (prefix, anchor) in BLOCKS.items():
        group = next((g for g in groups if anchor in g), set())
        options[block] = {d for d in group if d.startswith(prefix)} | set(READ_BY_LAUNCHER.get(block, ()))
    return options


def _key_issues(raw: dict[str, Any]) -> list[RecipeIssue]:
    """Unknown keys at the top (accelerate's loader would refuse them) and in the nested blocks (dropped silently)."""
    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig

    sagemaker = str(raw.get("compute_environment", "")) == "AMAZON_SAGEMAKER"
    fields = {*(SageMakerConfig if sagemaker else ClusterConfig).__dataclass_fields__, *LEGACY_KEYS}
    issues = [
        RecipeIssue((key,), "unknown key (accelerate refuses the file)", allowed=None, hint=did_you_mean(key, fields))
        for key in raw
        if key not in fields
    ]
    for block, allowed in _launch_options().items():
        value = raw.get(block)
        if not allowed or value is None:
            continue  # no such block here, or an accelerate without these options
        if not isinstance(value, dict):
            issues.append(RecipeIssue((block,), "should be a mapping of keys", value))
            continue
        prefix = BLOCKS[block][0]
        for key in value:
            full = key if str(key).startswith(prefix) else f"{prefix}{key}"
            if full not in allowed:
                hint = did_you_mean(full, allowed) or f"Known keys: {', '.join(sorted(allowed))}."
                issues.append(RecipeIssue((block, key), "unknown key (accelerate launch would ignore it)", hint=hint))
    return issues


def _flag(value: Any) -> bool:
    """accelerate's reading of a yes/no value: a bool, or a string such as ``"true"`` / ``"False"``."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "yes", "1")


def _number(value: Any, default: float) -> float | None:
    """A float from a config value; ``default`` for ``"auto"``, ``None`` for anything else."""
    if str(value) == "auto":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or str(value).strip().lower() in ("true", "false", "yes", "no", "1", "0")


def _precision_issues(config: Any, raw: dict[str, Any], recipe: Any | None) -> list[RecipeIssue]:
    """``mixed_precision`` read as YAML 1.1 (an unquoted ``no`` is the boolean false), and against the recipe."""
    value = raw.get("mixed_precision")
    if isinstance(value, bool):
        return [
            RecipeIssue(("mixed_precision",), "is a boolean: YAML reads an unquoted no as false, which accelerate "
                        "launch cannot use", value, "'no', 'fp16', 'bf16' or 'fp8'", "Quote it: mixed_precision: 'no'.")
        ]  # fmt: skip
    precision = config.mixed_precision or "no"
    stated = "mixed_precision" in raw or raw.get("fp16")  # absent: accelerate's "no" is no statement of the user's
    if recipe is None or not stated or precision == recipe.train.mixed_precision:
        return []
    wanted = recipe.train.mixed_precision
    return [
        RecipeIssue(
            ("mixed_precision",),
            f"differs from the recipe's train.mixed_precision {wanted!r}, the precision fewstep trains in (it passes "
            "the recipe's value to Accelerator and this one is ignored)",
            precision,
            hint=f"Set train.mixed_precision={precision} in the recipe (or as an override), or mixed_precision: "
            f"'{wanted}' here.",
        )
    ]


def _fsdp_issues(config: Any) -> list[RecipeIssue]:
    """FSDP2 only, with values that FSDP2 takes (accelerate's own lists of policies and state dict types)."""
    if str(config.distributed_type.value) != "FSDP":
        return []
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY

    fsdp = config.fsdp_config
    version = fsdp.get("fsdp_version", fsdp.get("version", 1))  # accelerate's default is FSDP1
    if str(version) != "2":
        return [
            RecipeIssue(
                ("fsdp_config", "fsdp_version"),
                "fewstep supports FSDP2 only (torch fully_shard, sharded per parameter); FSDP1 is not supported"
                + (" (1 is accelerate's default when the key is absent)" if "fsdp_version" not in fsdp else ""),
                version,
                "2",
                "Set fsdp_version: 2; recipes/accelerate/fsdp2_full_shard.yaml is a complete FSDP2 config.",
            )
        ]
    issues = []
    reshard = fsdp.get("fsdp_reshard_after_forward", True)
    if not _is_flag(reshard):
        issues.append(
            RecipeIssue(("fsdp_config", "fsdp_reshard_after_forward"), "takes true or false in FSDP2 (FSDP1 sharding "
                        "strategy names do not apply)", reshard, "true (full shard) or false (shard-grad-op)")
        )  # fmt: skip
    checks = (("fsdp_state_dict_type", FSDP2_STATE_DICT_TYPE), ("fsdp_auto_wrap_policy", FSDP_AUTO_WRAP_POLICY))
    for key, choices in checks:
        if key in fsdp and str(fsdp[key]).upper() not in choices:
            issues.append(RecipeIssue(("fsdp_config", key), "is not an FSDP2 choice", fsdp[key], ", ".join(choices)))
    return issues


def _cpu_issues(config: Any) -> list[RecipeIssue]:
    """FSDP and DeepSpeed with ``use_cpu: true``: accelerate sets neither up on CPUs (nor with ACCELERATE_USE_CPU=1)."""
    kind = str(config.distributed_type.value)
    if not config.use_cpu or kind not in ("FSDP", "DEEPSPEED"):
        return []
    return [
        RecipeIssue(("use_cpu",), f"accelerate does not set up {kind} on CPUs: the run would be plain data "
                    "parallelism (every rank holding the whole model)", True,
                    hint=f"Set use_cpu: false ({kind} runs on GPUs), or use ddp.yaml.")
    ]  # fmt: skip


def _deepspeed_issues(config: Any, recipe: Any | None, machine: bool) -> list[RecipeIssue]:
    """DeepSpeed: installed, a ZeRO stage, and clipping / accumulation as the recipe says."""
    if str(config.distributed_type.value) != "DEEPSPEED":
        return []
    ds = config.deepspeed_config
    issues = []
    if machine and importlib.util.find_spec("deepspeed") is None:
        issues.append(
            RecipeIssue(("distributed_type",), "DEEPSPEED needs the deepspeed package, which is not installed",
                        "DEEPSPEED", hint=f"Install it: {DEEPSPEED_INSTALL}.")
        )  # fmt: skip
    config_file = ds.get("deepspeed_config_file")
    if machine and config_file and not Path(str(config_file)).expanduser().is_file():
        issues.append(RecipeIssue(("deepspeed_config", "deepspeed_config_file"), "no such file", config_file))
    stage = ds.get("zero_stage")
    if stage is not None and str(stage) not in ("0", "1", "2", "3"):
        issues.append(RecipeIssue(("deepspeed_config", "zero_stage"), "is not a ZeRO stage", stage, "0, 1, 2 or 3"))
    if recipe is None or config_file:
        return issues  # a DeepSpeed JSON file holds its own clipping and accumulation
    steps = ds.get("gradient_accumulation_steps")
    if steps is not None and str(steps) != str(recipe.train.gradient_accumulation_steps):
        issues.append(
            RecipeIssue(("deepspeed_config", "gradient_accumulation_steps"), "replaces the recipe's "
                        f"train.gradient_accumulation_steps ({recipe.train.gradient_accumulation_steps})", steps,
                        hint="Remove it here (the recipe's value then applies) or make the two equal.")
        )  # fmt: skip
    clip = ds.get("gradient_clipping", "auto")
    wanted = recipe.optim.grad_clip or 0.0  # DeepSpeed: 0 is no clipping
    if _number(clip, default=1.0) != wanted:  # accelerate fills "auto" with 1.0
        issues.append(
            RecipeIssue(("deepspeed_config", "gradient_clipping"), "DeepSpeed clips gradients itself at this value "
                        f"(accelerate's default 1.0 when absent), not at the recipe's optim.grad_clip "
                        f"({recipe.optim.grad_clip})", clip, hint=f"Set gradient_clipping: {wanted} here.")
        )  # fmt: skip
    return issues


def _parallelism_issues(config: Any) -> list[RecipeIssue]:
    """A hybrid (replicate x shard) mesh on FSDP2 that covers exactly ``num_processes``."""
    sizes = config.parallelism_config
    if not sizes:
        return []
    size = {n: int(sizes.get(f"parallelism_config_{n}", 1)) for n in (*DATA_PARALLEL_SIZES, *MODEL_PARALLEL_SIZES)}
    issues = []
    version = str(config.fsdp_config.get("fsdp_version", 1))
    if str(config.distributed_type.value) != "FSDP" or version != "2":
        issues.append(
            RecipeIssue(("parallelism_config",), "needs distributed_type: FSDP with fsdp_version: 2 (accelerate launch "
                        "refuses it otherwise)", hint="Start from recipes/accelerate/fsdp2_hybrid.yaml.")
        )  # fmt: skip
    for name in MODEL_PARALLEL_SIZES:
        if size[name] != 1:
            issues.append(
                RecipeIssue(("parallelism_config", f"parallelism_config_{name}"), "fewstep trains data-parallel only "
                            "(replicate x shard); tensor, context and sequence parallelism are not supported",
                            size[name], "1")
            )  # fmt: skip
    processes, replicate = config.num_processes, size["dp_replicate_size"]
    group = size["dp_shard_size"] * math.prod(size[n] for n in MODEL_PARALLEL_SIZES)  # processes per replica
    if not processes or processes < 1 or replicate * group == 1:
        return issues  # num_processes given on the command line; or all 1: accelerate replicates over every process
    if processes % group:
        issues.append(
            RecipeIssue(("parallelism_config", "parallelism_config_dp_shard_size"), f"does not divide num_processes "
                        f"({processes}): every shard group needs the same number of processes", size["dp_shard_size"],
                        f"a divisor of {processes}")
        )  # fmt: skip
    elif replicate * group != processes:
        issues.append(
            RecipeIssue(("parallelism_config", "parallelism_config_dp_replicate_size"), f"times the shard group size "
                        f"({group}) is {replicate * group}, but num_processes is {processes} (accelerate needs them "
                        "equal)", replicate, str(processes // group))
        )  # fmt: skip
    return issues


def _machine_issues(config: Any) -> list[RecipeIssue]:
    """Process and machine counts that accelerate launch would refuse or round down."""
    issues = []
    machines, processes = config.num_machines, config.num_processes
    if str(config.distributed_type.value) == "MULTI_GPU" and processes is not None and 0 < processes < 2:
        issues.append(
            RecipeIssue(("num_processes",), "MULTI_GPU needs at least 2 processes", processes,
                        hint="Use distributed_type: 'NO' for one process.")
        )  # fmt: skip
    if machines <= 1:
        return issues
    if not config.main_process_ip:
        issues.append(
            RecipeIssue(("main_process_ip",), f"is not set, but num_machines is {machines}: the other machines "
                        "connect to machine 0 at this address", hint="Set it to machine 0's IP address as the others "
                        "reach it, or pass --main_process_ip to accelerate launch on every machine.")
        )  # fmt: skip
    if processes and processes > 0 and processes % machines:
        issues.append(
            RecipeIssue(("num_processes",), f"counts the processes on all {machines} machines and must split evenly "
                        "over them (accelerate would round the processes per machine down)", processes,
                        f"a multiple of {machines}")
        )  # fmt: skip
    if not (isinstance(config.machine_rank, int) and 0 <= config.machine_rank < machines):
        issues.append(
            RecipeIssue(("machine_rank",), f"should be 0 .. {machines - 1} (this machine's place among the "
                        f"{machines})", config.machine_rank)
        )  # fmt: skip
    return issues


__all__ = [
    "describe_launch_config",
    "is_launch_config",
    "launch_config_issues",
    "launch_configs_dir",
    "list_launch_configs",
    "resolve_launch_config",
]
