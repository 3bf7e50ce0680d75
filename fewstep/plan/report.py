"""A ``Plan`` as text (tables for a person) or JSON (for scripts), and the launch command of a layout."""

from __future__ import annotations

import shlex
from typing import Any

from fewstep.plan.layouts import RankMemory
from fewstep.plan.planner import GIB, Plan


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def launch_command(plan: Plan, rank: RankMemory, recipe_arg: str, overrides: list[str]) -> str:
    """The command that trains the recipe in ``rank``'s layout (``accelerate launch`` flags for several processes or
    FSDP2; the checkpointing switch as a recipe override when the layout differs from the recipe)."""
    layout, n, node = rank.layout, plan.world_size, min(plan.gpus_per_node, plan.world_size)
    extra = list(overrides)
    if layout.checkpointing != plan.recipe.student.gradient_checkpointing:
        extra.append(f"student.gradient_checkpointing={str(layout.checkpointing).lower()}")
    train = ["-m", "fewstep", "train", recipe_arg, *extra]
    if layout.strategy == "ddp" and n == 1:
        return shlex.join(["fewstep", "train", recipe_arg, *extra])
    flags = ["accelerate", "launch", "--num_processes", str(n)]
    if n > node:
        flags += ["--num_machines", str(n // node), "--machine_rank", "$NODE_RANK", "--main_process_ip", "$MASTER_ADDR"]
    if layout.strategy == "ddp":
        flags.append("--multi_gpu")
    else:
        flags += [
            "--use_fsdp", "--fsdp_version", "2",
            "--fsdp_reshard_after_forward", "false" if layout.strategy == "fsdp2_shard_grad_op" else "true",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", ",".join(plan.wrap_classes),
            "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
        ]  # fmt: skip
        if layout.offload:
            flags += ["--fsdp_offload_params", "true"]
        if layout.strategy == "hsdp":
            flags += ["--parallelism_config_dp_replicate_size", str(n // node), "--parallelism_config_dp_shard_size",
                      str(node)]  # fmt: skip
    return " ".join(shlex.quote(w) if not w.startswith("$") else w for w in flags + train)


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
        fits = "refused" if rank.refused else ("yes" if plan.fits(rank) else "no")
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
        ]
    refused = next((rank.refused for rank in plan.ranks if rank.refused), None)
    if refused:
        out.append(f"note: sharded layouts are refused for this objective: {refused}")
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
                "refused": rank.refused,
            }
            for rank in plan.ranks
        ],
        "recommended": None if best is None else best.layout.name,
        "launch": None if best is None else launch_command(plan, best, recipe_arg, overrides),
        "notes": plan.notes,
    }
