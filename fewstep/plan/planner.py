"""``plan_recipe``: how much GPU memory a recipe needs per rank, for every layout, before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from fewstep.models.backbones import default_resolution
from fewstep.objectives.protocol import BackboneUse
from fewstep.plan.activations import ActivationEstimate, estimate_activations, mode_of
from fewstep.plan.inputs import VIDEO_FRAMES, TrainingShape, default_text_tokens, forward_network
from fewstep.plan.inventory import Role, Tensors, parameter_roles, trainable_groups
from fewstep.plan.layouts import Layout, RankMemory, StepCost, candidate_layouts, rank_memory
from fewstep.plan.meta import MetaModels, build_meta_models
from fewstep.train.sharding import block_classes

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe

GIB = 2**30


@dataclass
class Plan:
    """Everything ``fewstep plan`` reports.

    Attributes:
        recipe: the validated recipe.
        models: the meta-device pipeline, teacher, student and objective.
        roles: every parameter owner (``fewstep.plan.inventory``).
        groups: trainable parameters per optimizer.
        shape: the micro-batch one rank trains on.
        uses: how each phase uses the backbone (``objective.backbone_use()``).
        activations: the estimate without and (when the backbone supports it) with checkpointing.
        world_size, gpus_per_node, gpu_memory_bytes: the machine asked about.
        headroom: the fraction of each GPU kept free for what is not planned (the CUDA context, communication
            buffers, the allocator's fragmentation).
        ranks: the per-rank peak of every layout, cheapest first.
        wrap_classes: the blocks FSDP wraps one by one.
        notes: what else the reader should know.
    """

    recipe: Recipe
    models: MetaModels
    roles: list[Role]
    groups: dict[str, Tensors]
    shape: TrainingShape
    uses: dict[str, BackboneUse]
    activations: dict[bool, ActivationEstimate]
    world_size: int
    gpus_per_node: int
    gpu_memory_bytes: int
    ranks: list[RankMemory]
    wrap_classes: list[str]
    headroom: float = 0.1
    notes: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> int:
        """What a rank may plan to use: the GPU's memory less the headroom."""
        return int(self.gpu_memory_bytes * (1.0 - self.headroom))

    def fits(self, rank: RankMemory) -> bool:
        return rank.total_bytes <= self.usable_bytes

    @property
    def recommended(self) -> RankMemory | None:
        """The cheapest layout that fits (``candidate_layouts`` order), or None."""
        return next((r for r in self.ranks if self.fits(r)), None)


def backbone_use(objective: Any, groups: dict[str, Tensors]) -> dict[str, BackboneUse]:
    """``objective.backbone_use()`` (an objective's optional declaration for the planner), else one plain forward
    with gradients per trainable group."""
    declared = getattr(objective, "backbone_use", None)
    uses = dict(declared()) if callable(declared) else {}
    return {group: uses.get(group, BackboneUse()) for group in groups}


def training_shape(
    models: MetaModels, recipe: Recipe, frames: int | None, text_tokens: int | None
) -> tuple[TrainingShape, list[str]]:
    """The micro-batch of one rank: ``data.batch_size`` samples at the resolution they are drawn at: ``data.resolution``
    for data with images, the objective's own ``resolution`` for data-free (prompt) runs, else the pipeline's
    default; video clips of ``frames`` frames, else the recipe's ``data.num_frames``, else ``VIDEO_FRAMES``."""
    notes = []
    own = getattr(getattr(models.components.objective, "config", None), "resolution", None)
    data_free = recipe.data.source == "prompts"
    resolution = (own or recipe.data.resolution) if data_free else (recipe.data.resolution or own)
    if resolution is None:
        try:
            resolution = default_resolution(models.pipeline)
        except (AttributeError, TypeError, ValueError):
            resolution = 512
            notes.append("The pipeline has no default resolution: planned at 512 px (set data.resolution).")
    backbone = forward_network(models.components.student.denoiser.backbone)
    tokens = default_text_tokens(backbone) if text_tokens is None else text_tokens
    frames = frames or recipe.data.num_frames or VIDEO_FRAMES
    return TrainingShape(recipe.data.batch_size, int(resolution), tokens, frames), notes


def wrap_units(backbone: nn.Module) -> tuple[list[str], int, int]:
    """The classes the trainer's FSDP2 wraps block by block (``fewstep.train.sharding.block_classes``), the largest
    unit's parameter bytes (a unit gathers the parameters of no unit nested inside it) and the root's own bytes
    (parameters outside every unit)."""
    classes = list(block_classes(backbone))
    owner: dict[int, int] = {}  # parameter -> the innermost unit holding it (modules() runs outer before inner)
    sizes: dict[int, int] = {}
    for module in backbone.modules():
        if type(module).__name__ in classes:
            for p in module.parameters():
                owner[id(p)] = id(module)
    root = 0
    for p in backbone.parameters():
        size = p.numel() * p.element_size()
        if id(p) in owner:
            sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + size
        else:
            root += size
    return classes, max(sizes.values(), default=0), root


def sampling_notes(recipe: Recipe, shape: TrainingShape, plain: ActivationEstimate) -> list[str]:
    """What the plan leaves out but a run may do: sample grids run the student without gradients on
    ``train.num_sample_images`` images at once (then the VAE decodes them)."""
    if not recipe.train.sample_every:
        return []
    images = recipe.train.num_sample_images
    working = plain.forward_bytes / max(shape.batch, 1) * images
    return [
        f"Sample grids (train.sample_every={recipe.train.sample_every}) run the student without gradients on "
        f"{images} images at once: about {working / GIB:.2f} GiB of working memory on top of the static state, plus "
        "the VAE decode, which this plan does not count (lower train.num_sample_images if that is too much)."
    ]


def plan_recipe(
    recipe: Recipe,
    world_size: int = 1,
    gpu_memory_bytes: int = 80 * GIB,
    gpus_per_node: int = 8,
    device: str = "cuda",
    frames: int | None = None,
    text_tokens: int | None = None,
    headroom: float = 0.1,
) -> Plan:
    """Per-rank memory of ``recipe`` for every layout on ``world_size`` GPUs of ``gpu_memory_bytes`` each.

    Args:
        recipe: a validated recipe.
        world_size: GPUs in all.
        gpu_memory_bytes: memory of one GPU.
        gpus_per_node: GPUs per machine (hybrid sharding shards within one).
        device: ``cuda`` (what the plan is for) or ``cpu`` (the CPU run's own extras: AdamW's step counters and the
            weight check's copy live with the weights).
        frames: video frames per sample (video backbones).
        text_tokens: prompt tokens per sample (default: the family's pipeline maximum).
        headroom: fraction of each GPU not to plan for (CUDA context, communication buffers, fragmentation).

    Raises:
        FileNotFoundError: the teacher's configs are not on this machine.
        ValueError: bad sizes, or a recipe that does not fit its teacher.
    """
    if world_size < 1 or gpus_per_node < 1 or gpu_memory_bytes <= 0 or not 0.0 <= headroom < 1.0:
        raise ValueError(
            f"--gpus {world_size}, --gpus-per-node {gpus_per_node} and --gpu-memory {gpu_memory_bytes} bytes must "
            f"all be positive and --headroom {headroom} in [0, 1)."
        )
    models = build_meta_models(recipe)
    roles = parameter_roles(models)
    groups = trainable_groups(roles)
    shape, notes = training_shape(models, recipe, frames, text_tokens)
    uses = backbone_use(models.components.objective, groups)
    backbone = models.components.student.denoiser.backbone
    can_checkpoint = bool(getattr(backbone, "_supports_gradient_checkpointing", False))
    teacher, network = models.components.teacher, forward_network(backbone)
    activations = {
        ckpt: estimate_activations(network, teacher, shape, mode_of(recipe, ckpt)) for ckpt in {False, can_checkpoint}
    }
    classes, largest, root = wrap_units(backbone)
    gathered = {"largest unit": largest, "root": root,
                "all": sum(r.params.bytes for r in roles if r.kind in ("frozen", "trainable"))}  # fmt: skip
    ranks = []
    for layout in candidate_layouts(world_size, gpus_per_node, can_checkpoint):
        act = activations[layout.checkpointing]
        costs = {
            g: StepCost(act.graph_bytes, act.transient_bytes, act.forward_bytes, u.graphs, u.no_grad_batch)
            for g, u in uses.items()
        }
        ranks.append(rank_memory(roles, groups, costs, gathered, layout, world_size, recipe, device))
    notes = [*models.notes, *notes, *sampling_notes(recipe, shape, activations[False])]
    if activations[False].coefficients_of != type(network).__name__:
        notes.append(
            f"No activation coefficients measured for {type(network).__name__}: borrowed the largest measured "
            "(`python scripts/bench/plan_coefficients.py` measures them)."
        )
    return Plan(recipe, models, roles, groups, shape, uses, activations, world_size, gpus_per_node,
                gpu_memory_bytes, ranks, classes, headroom, notes)  # fmt: skip


def layout_by_name(plan: Plan, name: str) -> RankMemory:
    """The plan's row for layout ``name`` (``ddp``, ``fsdp2_full_shard+offload+ckpt``, ...)."""
    for rank in plan.ranks:
        if rank.layout.name == name:
            return rank
    raise ValueError(f"No layout {name!r} in this plan; its layouts: {', '.join(r.layout.name for r in plan.ranks)}.")


__all__ = ["GIB", "Layout", "Plan", "RankMemory", "layout_by_name", "plan_recipe"]
