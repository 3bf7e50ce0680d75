"""Gradient averaging for objectives whose forwards go around the prepared (DDP-wrapped) modules.

DDP all-reduces gradients from hooks it arms in its own ``forward``. sCM, rCM and TBCM take a JVP of the student
(``torch.func.jvp`` cannot pass through DDP's wrapper), so they call the backbone itself and DDP never syncs.
Such an objective sets ``bypasses_prepared = True``; the trainer then averages the phase's gradients over ranks
once per optimizer step (after the accumulation loop, before clipping), which is what DDP would have done. The same
holds for an objective's ``auxiliary()`` modules, which are never wrapped.
DeepSpeed ZeRO owns the gradients and cannot be averaged like this: refused up front for such objectives. FSDP2 as
fewstep applies it (``fewstep.train.sharding``) reduces gradients from hooks on the sharded modules themselves, so
every objective runs under it; only the auxiliary modules, which stay whole, are averaged here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fewstep.objectives.protocol import Objective

SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


DEEPSPEED_REFUSAL = (
    "fewstep's trainer does not run under DeepSpeed: DeepSpeed drives one model per engine, while most distillation "
    "objectives train two or more roles (DMD2's student and fake score, a GAN head, adapters), and its optimizer state "
    "holds objects that fewstep's checkpoints (tensors and plain values only, so that no checkpoint can run code) do "
    "not store. Shard with FSDP2, which takes every objective: accelerate launch --config_file "
    "recipes/accelerate/fsdp2_full_shard.yaml (as ZeRO-3), fsdp2_shard_grad_op.yaml (ZeRO-2) or fsdp2_offload.yaml "
    "(ZeRO-Offload), or train.fsdp in the recipe."
)


def check_engine(accelerator: Any) -> None:
    """Refuse engines the trainer cannot drive (DeepSpeed, Megatron-LM), before anything loads.

    Raises:
        ValueError: the launch's distributed type is DeepSpeed or Megatron-LM (the message says what to use).
    """
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            DEEPSPEED_REFUSAL.replace("DeepSpeed", "Megatron-LM", 1) if kind == "MEGATRON_LM" else DEEPSPEED_REFUSAL
        )


def check_strategy(objective: Objective, accelerator: Any, sharded_by_fewstep: bool = False) -> None:
    """Refuse a sharded strategy that accelerate's wrapper would run for an objective that bypasses the prepared
    modules or has auxiliary modules. FSDP2 applied by fewstep itself (``sharded_by_fewstep``;
    ``fewstep.train.sharding``) shards the modules, not a wrapper, and takes every objective.

    Raises:
        ValueError: DeepSpeed (or a wrapper FSDP) with such an objective (the message names the objective and the fix).
    """
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind not in SHARDED or sharded_by_fewstep:
        return
    if objective.bypasses_prepared:
        raise ValueError(
            f"The {type(objective).__name__} objective differentiates the student with a JVP outside the wrapped "
            f"module, which {kind} cannot shard. Launch it with plain multi-GPU data parallelism "
            "(`accelerate launch --multi_gpu`), or use a memory saver that keeps whole weights per rank "
            "(student.kind: lora, gradient checkpointing)."
        )
    if objective.auxiliary():
        raise ValueError(
            f"The {type(objective).__name__} objective trains auxiliary modules (for {sorted(objective.auxiliary())}) "
            f"outside the wrapped model, which {kind} cannot shard. Launch it with plain multi-GPU data parallelism "
            "(`accelerate launch --multi_gpu`)."
        )


@torch.no_grad()
def average_gradients(module: nn.Module, accelerator: Any) -> int:
    """All-reduce (mean) the gradients of ``module``'s trainable parameters over the ranks, in one flat buffer.

    Returns:
        How many parameters had gradients (0: nothing to do).
    """
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not params or accelerator.num_processes == 1:
        return len(params)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    return len(params)
