"""A ``Plan`` as text (tables for a person) or JSON (for scripts), and the launch command of a layout."""

from __future__ import annotations

import shlex
from typing import Any

from fewstep.plan.layouts import RankMemory
from fewstep.plan.planner import GIB, Plan

LAUNCH_CONFIGS = "recipes/accelerate"  # the shipped accelerate configs
SHIPPED_CONFIGS = {  # (strategy, offload, FSDP activation checkpointing) -> the shipped config of that layout
    ("ddp", False, False): "ddp",
    ("fsdp2_full_shard", False, False): "fsdp2_full_shard",
    ("fsdp2_full_shard", False, True): "fsdp2_full_shard_ac",
    ("fsdp2_full_shard", True, False): "fsdp2_offload",
    ("fsdp2_shard_grad_op", False, False): "fsdp2_shard_grad_op",
    ("hsdp", False, False): "fsdp2_hybrid",
}


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def checkpointing_overrides(plan: Plan, rank: RankMemory) -> list[str]:
    """The recipe override that turns activation checkpointing on or off for ``rank``'s layout, if the recipe differs
    (a sharded layout turns it on with its FSDP setting instead, which checkpoints every sharded backbone)."""
    wanted, has = rank.layout.checkpointing, plan.recipe.student.gradient_checkpointing
    if wanted == has or (wanted and rank.layout.strategy != "ddp"):
        return []
    return [f"student.gradient_checkpointing={str(wanted).lower()}"]


def fsdp_overrides(plan: Plan, rank: RankMemory) -> list[str]:
    """The ``train.fsdp`` recipe overrides that shard as ``rank``'s layout does (``fewstep.train.sharding.fsdp_layout``
    builds the same layout from them as from the accelerate FSDP2 flags of ``launch_command``); empty for DDP."""
    layout, n, node = rank.layout, plan.world_size, min(plan.gpus_per_node, plan.world_size)
    if layout.strategy == "ddp":
        return []
    out = ["train.fsdp.enabled=true"]
    if layout.strategy == "fsdp2_shard_grad_op":
        out.append("train.fsdp.reshard_after_forward=false")
    if layout.strategy == "hsdp":
        out.append(f"train.fsdp.replicate={n // node}")
    if layout.offload:
        out.append("train.fsdp.cpu_offload=true")
    if layout.checkpointing and not plan.recipe.student.gradient_checkpointing:
        out.append("train.fsdp.activation_checkpointing=true")
    return out


def accelerate_launch(plan: Plan, flags: list[str], train: list[str]) -> str:
    """``accelerate launch`` of ``fewstep train *train`` on the plan's GPUs (and machines) with ``flags``."""
    n, node = plan.world_size, min(plan.gpus_per_node, plan.world_size)
    words = ["accelerate", "launch", "--num_processes", str(n)]
    if n > node:
        words += ["--num_machines", str(n // node), "--machine_rank", "$NODE_RANK", "--main_process_ip", "$MASTER_ADDR"]
    words += [*flags, "-m", "fewstep", "train", *train]
    return " ".join(shlex.quote(w) if not w.startswith("$") else w for w in words)


def launch_command(plan: Plan, rank: RankMemory, recipe_arg: str, overrides: list[str]) -> str:
    """The command that trains the recipe in ``rank``'s layout: ``fewstep train`` for one process, else ``accelerate
    launch`` with ``--multi_gpu`` or the FSDP2 flags (what a GPU launch reads; ``fsdp_overrides`` says the same as
    recipe keys)."""
    layout, n = rank.layout, plan.world_size
    train = [recipe_arg, *overrides, *checkpointing_overrides(plan, rank)]
    if layout.strategy == "ddp" and n == 1:
        return shlex.join(["fewstep", "train", *train])
    if layout.strategy == "ddp":
        return accelerate_launch(plan, ["--multi_gpu"], train)
    flags = [
        "--use_fsdp", "--fsdp_version", "2",
        "--fsdp_reshard_after_forward", "false" if layout.strategy == "fsdp2_shard_grad_op" else "true",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", ",".join(plan.wrap_classes),
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
    ]  # fmt: skip
    if layout.offload:
        flags += ["--fsdp_offload_params", "true"]
    if "train.fsdp.activation_checkpointing=true" in fsdp_overrides(plan, rank):
        flags += ["--fsdp_activation_checkpointing", "true"]
    return accelerate_launch(plan, flags + hybrid_flags(plan, rank), train)


def hybrid_flags(plan: Plan, rank: RankMemory) -> list[str]:
    """accelerate's 2-D mesh of a hybrid layout: shard within a node, replicate across nodes (none otherwise)."""
    if rank.layout.strategy != "hsdp":
        return []
    node = min(plan.gpus_per_node, plan.world_size)
    return ["--use_parallelism_config", "--parallelism_config_dp_replicate_size", str(plan.world_size // node),
            "--parallelism_config_dp_shard_size", str(node)]  # fmt: skip


def override_command(plan: Plan, rank: RankMemory, recipe_arg: str, overrides: list[str]) -> str | None:
    """``launch_command``'s layout as ``train.fsdp`` recipe overrides under a plain launch (any launcher; also on
    CPUs, where accelerate runs its FSDP flags as DDP), or None for DDP."""
    keys = fsdp_overrides(plan, rank)
    if not keys:
        return None
    train = [recipe_arg, *overrides, *checkpointing_overrides(plan, rank), *keys]
    if plan.world_size == 1:
        return shlex.join(["fewstep", "train", *train])
    return accelerate_launch(plan, ["--multi_gpu"], train)


def shipped_config(plan: Plan, rank: RankMemory) -> str | None:
    """The accelerate config in ``recipes/accelerate/`` of ``rank``'s layout, or None where none ships."""
    layout = rank.layout
    if plan.world_size == 1:
        return None
    if layout.strategy == "ddp" and plan.world_size > plan.gpus_per_node:
        return "multi_node"
    return SHIPPED_CONFIGS.get((layout.strategy, layout.offload, layout.checkpointing and layout.strategy != "ddp"))


def config_command(plan: Plan, rank: RankMemory, recipe_arg: str, overrides: list[str]) -> str | None:
    """``rank``'s layout launched with its shipped accelerate config (``shipped_config``; the command line sets the
    number of processes, machines and the hybrid mesh), or None."""
    name = shipped_config(plan, rank)
    if name is None:
        return None
    mesh = [f for f in hybrid_flags(plan, rank) if f != "--use_parallelism_config"]  # the config file switches it on
    flags = ["--config_file", f"{LAUNCH_CONFIGS}/{name}.yaml", *mesh]
    return accelerate_launch(plan, flags, [recipe_arg, *overrides, *checkpointing_overrides(plan, rank)])


def launch_alternatives(plan: Plan, rank: RankMemory, recipe_arg: str, overrides: list[str]) -> list[str]:
    """The other ways to launch ``rank``'s layout: as ``train.fsdp`` recipe keys and with a shipped config."""
    out = []
    keys = override_command(plan, rank, recipe_arg, overrides)
    if keys is not None:
        out.append(f"  the same as recipe keys (any launcher; CPUs too): {keys}")
    config = config_command(plan, rank, recipe_arg, overrides)
    if config is not None:
        out.append(f"  with a shipped accelerate config: {config}")
    if plan.world_size > 1:
        out.append(f"  shipped configs for every layout: {LAUNCH_CONFIGS}/ (`fewstep validate {recipe_arg} "
                   "--accelerate-config NAME` checks one against the recipe)")  # fmt: skip
    return out


def roles_table(plan: Plan) -> list[str]:
    lines = ["| role | kind | parameters | GiB | buffers GiB |", "|---|---|---:|---:|---:|"]
    for role in plan.roles:
        lines.append(
            f"| {role.name} | {role.kind} | {role.params.numel / 1e6:,.1f} M | {gib(role.params.bytes)} | "
            f"{gib(role.buffers.bytes)} |"
        )
    return lines


def layouts_table(plan: Plan) -> list[str]:
    lines = [
        "| layout | static GiB | activations GiB | other step GiB | peak GiB | host GiB | fits |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for rank in plan.ranks:
        activations = rank.step.get("activations", 0)
        fits = "yes" if plan.fits(rank) else "no"
        lines.append(
            f"| {rank.layout.name} | {gib(rank.static_bytes)} | {gib(activations)} | "
            f"{gib(rank.step_bytes - activations)} | {gib(rank.total_bytes)} | {gib(rank.host_bytes)} | {fits} |"
        )
    return lines


def render_text(plan: Plan, recipe_arg: str, overrides: list[str]) -> str:
    """The report ``fewstep plan`` prints."""
    r, s = plan.recipe, plan.shape
    act = plan.activations[False]
    out = [
        f"plan: {recipe_arg} — objective {r.objective.name}, teacher {r.teacher.pretrained} ({plan.models.family}, "
        f"{r.teacher.dtype}), student {r.student.kind}, mixed precision {r.train.mixed_precision}",
        f"configs: {plan.models.source}",
        f"per rank: batch {s.batch} at {s.resolution} px, {s.text_tokens} prompt tokens; backbone forwards kept for "
        f"backward per phase: {', '.join(f'{k} {u.graphs:g}' for k, u in plan.uses.items())}; activation "
        f"coefficients of {act.coefficients_of} ({act.num_blocks} blocks)",
        f"machine: {plan.world_size} GPU(s) of {gib(plan.gpu_memory_bytes)} GiB, {plan.gpus_per_node} per node; a "
        f"layout fits when its peak is at most {gib(plan.usable_bytes)} GiB ({plan.headroom:.0%} headroom)",
        "",
        *roles_table(plan),
        "",
        *layouts_table(plan),
        "",
    ]
    best = plan.recommended
    if best is None:
        out.append(
            f"No layout fits {gib(plan.usable_bytes)} GiB per GPU: use more GPUs (--gpus), a smaller "
            "data.batch_size or data.resolution, a LoRA student, or train.mixed_precision=bf16."
        )
    else:
        out += [
            f"recommended: {best.layout.name} ({gib(best.total_bytes)} GiB per rank, peak in the {best.phase} phase)",
            f"  {launch_command(plan, best, recipe_arg, overrides)}",
            *launch_alternatives(plan, best, recipe_arg, overrides),
        ]
    out += [f"note: {note}" for note in plan.notes]
    return "\n".join(out)


def to_json(plan: Plan, recipe_arg: str, overrides: list[str]) -> dict[str, Any]:
    """The plan as plain data (bytes as integers)."""
    best = plan.recommended
    return {
        "recipe": recipe_arg,
        "overrides": list(overrides),
        "objective": plan.recipe.objective.name,
        "teacher": plan.recipe.teacher.pretrained,
        "family": plan.models.family,
        "configs": plan.models.source,
        "world_size": plan.world_size,
        "gpus_per_node": plan.gpus_per_node,
        "gpu_memory_bytes": plan.gpu_memory_bytes,
        "usable_bytes": plan.usable_bytes,
        "shape": vars(plan.shape),
        "backbone_use": {k: vars(u) for k, u in plan.uses.items()},
        "activations": {
            ("checkpointing" if ckpt else "plain"): vars(estimate) for ckpt, estimate in plan.activations.items()
        },
        "roles": [
            {
                "name": r.name,
                "kind": r.kind,
                "group": r.group,
                "params": r.params.numel,
                "param_bytes": r.params.bytes,
                "buffer_bytes": r.buffers.bytes,
            }  # fmt: skip
            for r in plan.roles
        ],
        "layouts": [
            {
                "layout": rank.layout.name,
                "strategy": rank.layout.strategy,
                "offload": rank.layout.offload,
                "checkpointing": rank.layout.checkpointing,
                "shard_size": rank.layout.shard_size,
                "persistent": rank.persistent,
                "step": rank.step,
                "phase": rank.phase,
                "static_bytes": rank.static_bytes,
                "step_bytes": rank.step_bytes,
                "peak_bytes": rank.total_bytes,
                "host_bytes": rank.host_bytes,
                "fits": plan.fits(rank),
                "fsdp_overrides": fsdp_overrides(plan, rank),
                "accelerate_config": shipped_config(plan, rank),
            }
            for rank in plan.ranks
        ],
        "recommended": None if best is None else best.layout.name,
        "launch": None if best is None else launch_command(plan, best, recipe_arg, overrides),
        "launch_with_overrides": None if best is None else override_command(plan, best, recipe_arg, overrides),
        "launch_with_config": None if best is None else config_command(plan, best, recipe_arg, overrides),
        "notes": plan.notes,
    }
