"""FSDP2 for every role layout: torch's ``fully_shard`` applied block by block to each distinct backbone of a run.

accelerate's own FSDP2 path prepares one model per ``prepare`` call and refuses to run on CPUs, while a distillation
run holds several roles over one or more backbones: a frozen teacher base carrying the student's and the fake
score's LoRA adapters, or a full student, a full fake score and a frozen teacher. So the trainer shards the roles
itself, with the same engine and the same settings (``train.fsdp``, or the FSDP plugin of an ``accelerate launch``
with an FSDP2 config):

* every distinct backbone (the teacher's, a full student's, a full fake score's copy) is sharded once: each block
  of the classes its diffusers model declares unsplittable (``_no_split_modules``, else ``_repeated_blocks``) is
  its own FSDP unit, then the backbone root takes the rest. Frozen and trainable weights shard the same way;
* a role that is a view of adapters on a shared base (``AdapterRole``) keeps viewing the same weights: the
  parameters ``fully_shard`` replaced are re-bound in every role module (``rebind``);
* modules outside the backbones (a GAN head, sCM's adaptive weighting) stay whole on every rank and have their
  gradients averaged as with DDP (``fewstep.train.sync``).

Gradients are reduce-scattered by FSDP's own hooks in backward, whichever way the objective calls the backbone (the
hooks are on the modules, not on a wrapper), so JVP objectives need no manual averaging. Forwards are collective:
under FSDP every rank must run the same forwards (sample grids run on every rank; the main one writes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fewstep.models.student import enable_gradient_checkpointing

if TYPE_CHECKING:
    from fewstep.config.schema import FSDPConfig

FALLBACK_BLOCKS = ("ResnetBlock2D", "Attention")  # models that declare no blocks (UNet2DModel)


@dataclass(frozen=True)
class FSDPLayout:
    """How the run shards.

    Attributes:
        reshard_after_forward: free the gathered weights after each block's forward (full shard, ZeRO-3); False
            keeps them until the backward (shard grad-op, ZeRO-2: more memory, one all-gather fewer).
        replicate: hybrid sharding: the ranks form ``replicate`` groups that each hold a full sharded copy
            (shard within a node, replicate across nodes); 1 shards over every rank.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        activation_checkpointing: recompute each block's activations in backward.
        param_dtype: the dtype FSDP gathers weights in (None: each weight's stored dtype, e.g. a bf16 frozen base and
            fp32 trainable weights). fewstep leaves it None, also under an accelerate config with a mixed-precision
            policy: compute precision comes from ``train.mixed_precision`` (autocast), as in unsharded runs.
        reduce_dtype: the dtype gradients are reduced in (None: the gradients' own).
    """

    reshard_after_forward: bool = True
    replicate: int = 1
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None


def fsdp_layout(config: FSDPConfig | None, accelerator: Any) -> FSDPLayout | None:
    """The run's layout: the recipe's ``train.fsdp`` when set, else the FSDP plugin of an ``accelerate launch`` with
    an FSDP config, else None (no sharding).

    Raises:
        ValueError: an FSDP version 1 launch config (fewstep shards with FSDP2 only), or a hybrid degree that does
            not divide the number of processes.
    """
    world = accelerator.num_processes
    if config is not None and config.enabled:
        layout = FSDPLayout(
            reshard_after_forward=config.reshard_after_forward,
            replicate=config.replicate,
            cpu_offload=config.cpu_offload,
            activation_checkpointing=config.activation_checkpointing,
        )
    else:
        plugin = getattr(accelerator.state, "fsdp_plugin", None) if _launched_fsdp(accelerator) else None
        if plugin is None:
            return None
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "The accelerate config asks for FSDP version 1; fewstep shards with FSDP2 only. Set "
                "`fsdp_version: 2` in its fsdp_config (see recipes/accelerate/fsdp2_full_shard.yaml)."
            )
        from torch.distributed.fsdp import CPUOffloadPolicy

        reshard = plugin.reshard_after_forward
        layout = FSDPLayout(  # precision as in every fewstep run: autocast from train.mixed_precision
            reshard_after_forward=bool(reshard) if isinstance(reshard, bool) else True,
            replicate=_replicate_degree(accelerator),
            cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            activation_checkpointing=bool(plugin.activation_checkpointing),
        )
    if layout.cpu_offload and accelerator.device.type == "cpu":
        raise ValueError(
            "train.fsdp.cpu_offload=true moves the shards from the GPUs to host memory; this run is on CPUs, where "
            "they are in host memory already. Set it to false."
        )
    if layout.replicate < 1 or world % layout.replicate:
        raise ValueError(
            f"Hybrid sharding with {layout.replicate} replica groups needs a number of processes divisible by it; "
            f"this launch has {world}."
        )
    return layout


def _launched_fsdp(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1] == "FSDP"


def _replicate_degree(accelerator: Any) -> int:
    config = getattr(accelerator, "parallelism_config", None)
    return int(getattr(config, "dp_replicate_size", 1) or 1) if config is not None else 1


def device_mesh(layout: FSDPLayout, accelerator: Any) -> Any:
    """A 1-D mesh over every rank, or 2-D ``(replicate, shard)`` for hybrid sharding."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    kind = accelerator.device.type
    world = accelerator.num_processes
    if not dist.is_initialized():  # one process (plain `fewstep train`): a process group of one, in memory
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if layout.replicate > 1:
        shape = (layout.replicate, world // layout.replicate)
        return init_device_mesh(kind, shape, mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))


def block_classes(backbone: nn.Module) -> tuple[str, ...]:
    """The class names FSDP wraps as units in ``backbone``: what the diffusers model declares it cannot split."""
    declared = getattr(backbone, "_no_split_modules", None) or getattr(backbone, "_repeated_blocks", None)
    return tuple(declared) if declared else FALLBACK_BLOCKS


def shard_roots(roots: list[nn.Module], layout: FSDPLayout, mesh: Any) -> dict[int, nn.Parameter]:
    """``fully_shard`` each root (a backbone, or a role module holding one) block by block, then whole.

    Returns:
        ``{id(old parameter): new parameter}`` for every parameter ``fully_shard`` replaced (for ``rebind``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    before = {id(root): dict(root.named_parameters()) for root in roots}
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": layout.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=layout.param_dtype, reduce_dtype=layout.reduce_dtype),
    }
    if layout.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for root in roots:
        backbone = _backbone_of(root)
        if layout.activation_checkpointing and is_backbone(backbone):  # not small parts such as a GAN head
            _checkpoint_blocks(backbone)
        names = set(block_classes(backbone))
        blocks = [m for m in root.modules() if type(m).__name__ in names and m is not root]
        for block in reversed(blocks):  # innermost first: nested declared blocks each get their own unit
            if any(True for _ in block.parameters()):
                fully_shard(block, **kwargs)
        # the root's own weights (embeddings, input and output layers) stay gathered from its forward to the backward:
        # backward starts there, and a role that reads a block's features (the GAN's classify mode) never returns
        # the root's output, on which FSDP would hook the re-gather
        fully_shard(root, **{**kwargs, "reshard_after_forward": False})
    mapping: dict[int, nn.Parameter] = {}
    for root in roots:
        after = dict(root.named_parameters())
        for name, old in before[id(root)].items():
            new = after.get(name)
            if new is not None and new is not old:
                mapping[id(old)] = new
    return mapping


def _backbone_of(root: nn.Module) -> nn.Module:
    """The diffusers model inside a role module (the root itself when it is one)."""
    return next((m for m in root.modules() if is_backbone(m)), root)


def _checkpoint_blocks(backbone: nn.Module) -> None:
    """Activation checkpointing per block with the model's own switch (diffusers' ``enable_gradient_checkpointing``:
    the same blocks, and the parameter names, hence checkpoints and exports, unchanged)."""
    if not hasattr(backbone, "enable_gradient_checkpointing"):
        raise ValueError(
            f"train.fsdp.activation_checkpointing=true, but {type(backbone).__name__} has no "
            "`enable_gradient_checkpointing()`. Set it to false."
        )
    enable_gradient_checkpointing(backbone)  # each block recomputed under the adapter it ran with


def rebind(modules: list[nn.Module], mapping: dict[int, nn.Parameter]) -> int:
    """Point every registered parameter slot of ``modules`` that held a parameter ``fully_shard`` replaced at its
    replacement (role views such as ``AdapterRole`` register the shared base's parameter objects). Returns how many
    slots changed."""
    changed = 0
    for module in modules:
        for sub in module.modules():
            for key, param in list(sub._parameters.items()):
                if param is not None and id(param) in mapping:
                    sub._parameters[key] = mapping[id(param)]
                    changed += 1
    return changed


def sharding_roots(groups: dict[str, nn.Module], teacher_backbone: nn.Module) -> list[nn.Module]:
    """The modules to shard: the teacher's backbone (the frozen base; also the home of LoRA students and LoRA roles)
    and, inside every trainable group, each part whose weights are its own (a full student's or a full fake score's
    backbone, a GAN head). Weights that live in the teacher's backbone (adapter views) are only re-bound.

    A part is sharded where it is called: a backbone itself, not the wrappers around it (objectives call
    ``student.denoiser`` rather than ``student``, and FSDP gathers a unit's own weights in that unit's forward)."""
    owned = {id(p) for p in teacher_backbone.parameters()}
    roots = [teacher_backbone]

    def own_parts(module: nn.Module) -> list[nn.Module]:
        params = list(module.parameters())
        if not params:
            return []
        wraps_backbone = any(is_backbone(m) for m in module.modules() if m is not module)
        if any(id(p) in owned for p in params) or (wraps_backbone and not is_backbone(module)):
            return [part for child in module.children() for part in own_parts(child)]
        return [module]

    for module in groups.values():
        for part in own_parts(module):
            if all(part is not r for r in roots):
                roots.append(part)
    return roots


def is_backbone(module: nn.Module) -> bool:
    """A diffusers model (what a ``Denoiser`` calls)."""
    return hasattr(module, "_no_split_modules") and hasattr(module, "config")


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of a sharded tensor (a view of its storage); the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (collective for a sharded one: every rank must call)."""
    return t.full_tensor() if is_sharded(t) else t


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded and whole parameters together: the total 2-norm of every gradient (sharded
    ones reduced over their mesh), then one common scale. Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    squares = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, 2.0)
        squares = squares + full(norm).float().cpu() ** 2
    if whole:
        squares = squares + torch.nn.utils.get_total_norm(whole, 2.0).float().cpu() ** 2
    total = float(squares.sqrt())
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total
