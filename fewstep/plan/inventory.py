"""What a recipe keeps in memory besides activations, counted exactly from its meta models.

``parameter_roles`` lists every distinct parameter (and buffer) once, under the role that owns it:

* the trainable groups of ``objective.trainable()`` (plus each group's ``objective.auxiliary()`` module), in the
  dtype fewstep trains them in (fp32 master weights);
* ``teacher``: the frozen base, in ``teacher.dtype`` (a LoRA student, a shared-base fake score, experts and adapters
  add only their own weights to it);
* the pipeline's other networks (text encoders, VAE), frozen and kept on the device for the run;
* anything else the objective holds (a frozen EMA target network, a full copy), under its attribute name.

The per-step state of the trainer is then one function per concern, each mirroring what ``fewstep.train`` allocates:
gradients (the phase's group, in the parameters' dtype), AdamW's two moments per trainable parameter (``torch.optim.
AdamW``: fewstep has no 8-bit or fused-state optimizer), EMA shadows (fp32), the step guard's copy for undoing a bad
update (``train.rollback``), DDP's gradient buckets, and autocast's cached low-precision copies of fp32 weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe
    from fewstep.plan.meta import MetaModels

FP32_BYTES = 4
HALF_BYTES = 2
KINDS = ("trainable", "frozen", "encoder")  # encoder: a pipeline network besides the backbone (never sharded)


@dataclass(frozen=True)
class Tensors:
    """A count of tensors: elements, bytes (in their own dtypes) and how many tensors."""

    numel: int = 0
    bytes: int = 0
    count: int = 0

    def __add__(self, other: Tensors) -> Tensors:
        return Tensors(self.numel + other.numel, self.bytes + other.bytes, self.count + other.count)

    @classmethod
    def of(cls, tensors: list[Tensor]) -> Tensors:
        return cls(sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors), len(tensors))


@dataclass(frozen=True)
class Role:
    """One owner of parameters.

    Attributes:
        name: ``student``, ``fake_score``, ``student (auxiliary)``, ``teacher``, ``text_encoder_2``,
            ``objective.target``.
        kind: ``trainable``, ``frozen`` or ``encoder`` (see ``KINDS``).
        params: its parameters.
        buffers: its buffers (never sharded).
        group: the optimizer (trainable group) that updates a trainable role.
    """

    name: str
    kind: str
    params: Tensors
    buffers: Tensors
    group: str | None = None


class _Distinct:
    """Hands out each tensor once (a parameter shared by several roles belongs to the first that claims it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def take(self, tensors: Iterator[Tensor]) -> list[Tensor]:
        fresh = [t for t in tensors if id(t) not in self.seen]
        self.seen.update(id(t) for t in fresh)
        return fresh


def owned_modules(
    obj: Any, prefix: str, depth: int = 4, visited: set[int] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """``(attribute path, module)`` for every module an object holds in its attributes, lists and dicts (modules are
    not entered: their parameters come with them)."""
    visited = set() if visited is None else visited
    if id(obj) in visited or depth < 0:
        return
    visited.add(id(obj))
    if isinstance(obj, nn.Module):
        yield prefix, obj
        return
    if isinstance(obj, dict):
        items = [(f"{prefix}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, list | tuple):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | Tensor):
        items = [(f"{prefix}.{k}", v) for k, v in vars(obj).items()]
    else:
        return
    for path, value in items:
        yield from owned_modules(value, path, depth - 1, visited)


def parameter_roles(models: MetaModels) -> list[Role]:
    """Every distinct parameter and buffer of the run, each under the one role that owns it (see the module doc)."""
    objective, teacher = models.components.objective, models.components.teacher
    distinct, buffers, roles = _Distinct(), _Distinct(), []

    def add(name: str, kind: str, module: nn.Module, group: str | None = None, trainable_only: bool = False) -> None:
        params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
        taken = Tensors.of(distinct.take(iter(params)))
        owned = Tensors.of(buffers.take(module.buffers())) if not trainable_only else Tensors()
        if taken.count or owned.count:
            roles.append(Role(name, kind, taken, owned, group))

    auxiliary = objective.auxiliary()
    for group, module in objective.trainable().items():
        add(group, "trainable", module, group, trainable_only=True)
        if group in auxiliary:
            add(f"{group} (auxiliary)", "trainable", auxiliary[group], group, trainable_only=True)
    add("teacher", "frozen", teacher.denoiser)
    backbone = teacher.denoiser.backbone
    for name, component in models.pipeline.components.items():
        if isinstance(component, nn.Module) and component is not backbone:
            add(name, "encoder", component)
    for path, module in owned_modules(objective, "objective"):
        add(path, "frozen", module)
    return roles


def trainable_groups(roles: list[Role]) -> dict[str, Tensors]:
    """The parameters each optimizer updates (a group and its auxiliary module)."""
    groups: dict[str, Tensors] = {}
    for role in roles:
        if role.kind == "trainable":
            groups[role.group] = groups.get(role.group, Tensors()) + role.params
    return groups


# --- the trainer's state, one concern each --------------------------------------------------------------------------


def gradient_bytes(group: Tensors) -> int:
    """Gradients of one group while its phase runs, in the parameters' dtype (freed by ``zero_grad(set_to_none)``)."""
    return group.bytes


def adamw_state_bytes(group: Tensors, device: str = "cuda") -> int:
    """``torch.optim.AdamW``: ``exp_avg`` and ``exp_avg_sq`` like each parameter; the per-parameter ``step`` scalar
    (fp32) lives on the CPU unless the parameters do."""
    return 2 * group.bytes + (FP32_BYTES * group.count if device == "cpu" else 0)


def adamw_scratch_bytes(group: Tensors) -> int:
    """The foreach AdamW step's temporary ``sqrt(exp_avg_sq)``, one tensor like each parameter of the group."""
    return group.bytes


def ema_bytes(groups: dict[str, Tensors], recipe: Recipe) -> int:
    """``train.ema_decay``: an fp32 shadow of every trainable (and auxiliary) parameter."""
    return FP32_BYTES * sum(g.numel for g in groups.values()) if recipe.train.ema_decay is not None else 0


def step_guard_bytes(groups: dict[str, Tensors], recipe: Recipe, device: str = "cuda") -> int:
    """``train.rollback``: a flat copy of each optimizer's parameters to undo a bad update; on a CPU the weight check
    keeps a second flat copy (on a GPU it reduces in place)."""
    total = sum(g.bytes for g in groups.values())
    return total * (int(recipe.train.rollback) + int(device == "cpu"))


def ddp_bucket_bytes(groups: dict[str, Tensors], world_size: int) -> int:
    """DDP's gradient buckets (accelerate keeps ``gradient_as_bucket_view=False``): a second copy of every prepared
    group's gradients, allocated when the model is wrapped; none in a single process."""
    return sum(g.bytes for g in groups.values()) if world_size > 1 else 0


def autocast_cache_bytes(group: Tensors, recipe: Recipe) -> int:
    """bf16/fp16 mixed precision casts each fp32 trainable weight once per step and keeps the copy until the autocast
    region ends (the cache holds leaf tensors that require grad)."""
    return HALF_BYTES * group.numel if recipe.train.mixed_precision in ("bf16", "fp16") else 0
