"""How a run's memory divides over its GPUs: per-rank bytes of each layout (DDP, FSDP2 full shard, FSDP2 shard-grad-op,
hybrid sharding within a node), with or without CPU offload and activation checkpointing.

Per rank and per phase (one optimizer group updating), the peak is the larger of

* the backward: persistent state + the phase's activations + its gradients + autocast's cached weight copies
  + (FSDP) the parameters gathered for the blocks running now;
* the optimizer step: persistent state + the phase's gradients + AdamW's scratch tensor;

and the run's peak is the largest phase. Persistent state: frozen roles, pipeline encoders (never sharded: they are
not part of the trained model), trainable weights, AdamW moments of every group, EMA shadows, the step guard's copy
and DDP's gradient buckets.

Sharding (FSDP2 ``fully_shard``, block-wise as accelerate wraps ``_no_split_modules``): full shard divides
parameters (frozen roles too), gradients, optimizer state, EMA and the step guard's copy by the shard size and gathers
two blocks at a time (the running one and the prefetched one) plus the root's own parameters; shard-grad-op keeps the
gathered parameters from forward to backward (parameters replicated, the rest sharded); hybrid shards within a node
and replicates across nodes. CPU offload moves the sharded parameters, gradients and optimizer state (and what is
copied from them) to the host and runs AdamW there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fewstep.plan.inventory import (
    Role,
    Tensors,
    adamw_scratch_bytes,
    adamw_state_bytes,
    autocast_cache_bytes,
    ddp_bucket_bytes,
    ema_bytes,
    gradient_bytes,
    step_guard_bytes,
)

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe

STRATEGIES = ("ddp", "fsdp2_shard_grad_op", "hsdp", "fsdp2_full_shard")


@dataclass(frozen=True)
class Layout:
    """One way to lay a run over ``world_size`` GPUs.

    Attributes:
        strategy: one of ``STRATEGIES``.
        offload: parameters, gradients and optimizer state on the host (FSDP2 ``CPUOffloadPolicy``).
        checkpointing: activation checkpointing (``student.gradient_checkpointing``).
        shard_size: how many ranks one shard spans (1: replicated).
    """

    strategy: str
    offload: bool
    checkpointing: bool
    shard_size: int

    @property
    def name(self) -> str:
        parts = [self.strategy] + (["offload"] if self.offload else []) + (["ckpt"] if self.checkpointing else [])
        return "+".join(parts)


def candidate_layouts(world_size: int, gpus_per_node: int, checkpointing_ok: bool) -> list[Layout]:
    """Every layout worth listing for ``world_size`` GPUs, cheapest first (the order the recommendation follows):
    replicated before sharded, sharding before recomputation, recomputation before host offload."""
    node = min(gpus_per_node, world_size)
    shard = {"ddp": 1, "fsdp2_shard_grad_op": world_size, "hsdp": node, "fsdp2_full_shard": world_size}
    usable = [s for s in STRATEGIES if not (s == "hsdp" and (world_size <= node or world_size % node))]
    if world_size == 1:  # nothing to shard over: only the single process and host offload remain
        usable = ["ddp", "fsdp2_full_shard"]
    ckpt = [False, True] if checkpointing_ok else [False]
    out = []
    for offload in (False, True):
        for c in ckpt:
            for s in usable:
                if (s == "ddp" and offload) or (world_size == 1 and s != "ddp" and not offload):
                    continue
                out.append(Layout(s, offload, c, shard[s]))
    return out


@dataclass
class RankMemory:
    """The per-rank peak of one layout.

    Attributes:
        layout: the layout.
        persistent: bytes held on the GPU for the whole run, by what they are.
        step: bytes on top at the peak (activations, gradients, gathered parameters, ...), by what they are.
        phase: the trainable group whose step peaks.
        host_bytes: bytes this rank keeps on the host (offload).
    """

    layout: Layout
    persistent: dict[str, int] = field(default_factory=dict)
    step: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    host_bytes: int = 0

    @property
    def static_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def step_bytes(self) -> int:
        return sum(self.step.values())

    @property
    def total_bytes(self) -> int:
        return self.static_bytes + self.step_bytes


@dataclass(frozen=True)
class StepCost:
    """The activations of one phase's micro-step: ``graphs`` forwards kept for one backward, plus the larger of the
    backward's working memory and that of the widest forward without gradients (``no_grad_batch`` micro-batches)."""

    graph_bytes: int
    transient_bytes: int
    forward_bytes: int
    graphs: float
    no_grad_batch: float

    @property
    def activation_bytes(self) -> int:
        working = max(self.transient_bytes, int(self.no_grad_batch * self.forward_bytes))
        return int(self.graphs * self.graph_bytes) + working


def _div(value: int, n: int) -> int:
    return math.ceil(value / n)


def persistent_bytes(
    roles: list[Role], groups: dict[str, Tensors], layout: Layout, world_size: int, recipe: Recipe, device: str
) -> tuple[dict[str, int], int]:
    """GPU bytes held for the whole run by what they are, and the bytes offloaded to the host (per rank)."""
    n = layout.shard_size
    sharded = layout.strategy != "ddp"
    frozen = sum(r.params.bytes for r in roles if r.kind == "frozen")
    buffers = sum(r.buffers.bytes for r in roles)
    encoders = sum(r.params.bytes for r in roles if r.kind == "encoder")
    trainable = sum(g.bytes for g in groups.values())
    optimizer = sum(adamw_state_bytes(g, device) for g in groups.values())
    parts = {
        "frozen weights": _div(frozen, n) if sharded else frozen,
        "trainable weights": _div(trainable, n),
        "AdamW state": _div(optimizer, n),
        "EMA": _div(ema_bytes(groups, recipe), n),
        "step guard copy": _div(step_guard_bytes(groups, recipe, device), n),
    }
    host = 0
    if layout.offload:
        host = sum(parts.values())
        parts = dict.fromkeys(parts, 0)
    parts["encoders, VAE, buffers"] = encoders + buffers
    parts["DDP gradient buckets"] = ddp_bucket_bytes(groups, world_size) if layout.strategy == "ddp" else 0
    return parts, host


def step_bytes(
    group: Tensors, cost: StepCost, gathered: dict[str, int], layout: Layout, recipe: Recipe
) -> dict[str, int]:
    """What one phase adds at its peak (the larger of its backward and its optimizer step), per rank."""
    n = layout.shard_size
    grads = 0 if layout.offload else _div(gradient_bytes(group), n)
    activations = cost.activation_bytes
    if layout.strategy == "ddp":
        gather = 0
    elif layout.strategy == "fsdp2_shard_grad_op":
        gather = gathered["all"]
    else:
        gather = gathered["root"] + 2 * gathered["largest unit"]
    backward = {"activations": activations, "gradients": grads, "gathered parameters": gather,
                "autocast weight copies": _div(autocast_cache_bytes(group, recipe), n)}  # fmt: skip
    optimizer = {"gradients": grads, "AdamW scratch": 0 if layout.offload else _div(adamw_scratch_bytes(group), n)}
    return backward if sum(backward.values()) >= sum(optimizer.values()) else optimizer


def rank_memory(
    roles: list[Role],
    groups: dict[str, Tensors],
    costs: dict[str, StepCost],
    gathered: dict[str, int],
    layout: Layout,
    world_size: int,
    recipe: Recipe,
    device: str = "cuda",
) -> RankMemory:
    """The per-rank peak of ``layout``: persistent state plus the heaviest phase's step."""
    persistent, host = persistent_bytes(roles, groups, layout, world_size, recipe, device)
    best: tuple[int, str, dict[str, int]] = (-1, "", {})
    for phase, group in groups.items():
        step = step_bytes(group, costs[phase], gathered, layout, recipe)
        if sum(step.values()) > best[0]:
            best = (sum(step.values()), phase, step)
    return RankMemory(layout, persistent, best[2], best[1], host)
