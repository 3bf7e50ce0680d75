"""``Student``: the trainable denoiser, a full fine-tune or a LoRA (peft) on the teacher's own base.

A LoRA student never holds a second copy of the base: adapters are injected into the teacher's backbone, the base
stays frozen, and the teacher gets the view "adapters disabled" (``Teacher.add_view``). A full student is a deep copy.

Adapter switches (``adapters_disabled``, the DMD roles' ``active_adapter``) run several times per training step, so
they work on ``tuner_layers(module)``, a list of the module's LoRA layers cached per module, instead of walking the
whole network each time. ``Student.sampling()`` runs a LoRA student with its adapter merged into the base weights.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import Teacher

if TYPE_CHECKING:
    from peft import LoraConfig

# Attention projections plus the convs and linears that LCM-LoRA / diffusers' LoRA scripts adapt.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "unet": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    ],
    "transformer": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "img_mlp.net.0.proj",  # Qwen-Image's image and text MLPs
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
        "ff.linear_in",  # FLUX.2's SwiGLU MLPs (image and text streams) and its single blocks' fused projection
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "to_qkv_mlp_proj",
        "feed_forward.w1",  # Z-Image's SwiGLU MLPs (refiners and main blocks)
        "feed_forward.w2",
        "feed_forward.w3",
    ],
}


# module -> (adapter key, its LoRA layers); weak keys: a dropped backbone takes its entry with it
_TUNER_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, tuple[nn.Module, ...]]] = weakref.WeakKeyDictionary()


def _adapter_key(module: nn.Module) -> Any:
    """What changes when adapters are added to or deleted from ``module``: its ``peft_config`` and the names in it
    (diffusers' ``add_adapter`` / ``delete_adapters`` and peft's ``inject_adapter_in_model`` all update it)."""
    config = getattr(module, "peft_config", None)
    return (id(config), tuple(config)) if isinstance(config, dict) else None


def tuner_layers(module: nn.Module) -> tuple[nn.Module, ...]:
    """The peft adapter layers (``BaseTunerLayer``) inside ``module``, in ``module.modules()`` order.

    Cached per module and rebuilt when the adapter names in ``module.peft_config`` change, so the per-step adapter
    switches cost a dict lookup instead of a walk over every submodule. Call it on the module the adapters were added
    to (the backbone); after changing adapters without touching ``peft_config`` (e.g. diffusers'
    ``recurse_remove_peft_layers``), call ``forget_tuner_layers(module)``.

    Args:
        module: a network that may carry peft adapters.

    Returns:
        The adapter layers (empty if there are none).
    """
    key = _adapter_key(module)
    cached = _TUNER_LAYERS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft is imported on first use: it is slow to import

    layers = tuple(m for m in module.modules() if isinstance(m, BaseTunerLayer))
    _TUNER_LAYERS[module] = (key, layers)
    return layers


def forget_tuner_layers(module: nn.Module) -> None:
    """Drop ``module``'s cached ``tuner_layers`` (the next call walks the module again)."""
    _TUNER_LAYERS.pop(module, None)


@contextmanager
def _flag_set(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Set peft's per-layer attribute ``name`` to ``value`` on every adapter layer of ``module`` for the block.

    The flags are plain instance attributes, so they are written into each layer's ``__dict__``: the same effect as
    ``layer.name = value`` without ``nn.Module.__setattr__``'s parameter/buffer/submodule checks, which cost ~1 ms
    per switch on a network with ~80 adapted layers (several switches run in every training step)."""
    layers = tuner_layers(module)
    before = [getattr(layer, name) for layer in layers]
    for layer in layers:
        layer.__dict__[name] = value
    try:
        yield
    finally:
        for layer, previous in zip(layers, before):
            layer.__dict__[name] = previous


def adapters_disabled(module: nn.Module) -> AbstractContextManager[None]:
    """Run ``module`` as its frozen base (every LoRA layer bypassed), restored afterwards (even on error).

    Only peft's ``_disable_adapters`` flag is flipped. ``requires_grad`` stays as it is: peft's ``enable_adapters``
    freezes every adapter when disabling and re-enables gradients only for the *active* one when enabling, which
    would freeze a second trainable adapter on the same base (DMD's fake score, Phased DMD's experts)."""
    return _flag_set(module, "_disable_adapters", True)


def adapter_switched(module: nn.Module, name: str) -> AbstractContextManager[None]:
    """Run ``module`` with only LoRA adapter ``name`` active, restored afterwards (even on error).

    Only peft's ``_active_adapter`` is set: peft's own ``set_adapter`` also changes ``requires_grad``, which would
    change what DDP synchronises when two adapters share a base (DMD's student and fake score)."""
    return _flag_set(module, "_active_adapter", name)


def enable_gradient_checkpointing(backbone: nn.Module) -> None:
    """diffusers' per-block gradient checkpointing of ``backbone``, with each block recomputed in the backward in the
    state of its forward: the same adapter, and the same weights frozen.

    Roles share one base and switch adapters between forwards (DMD's student and fake score, the teacher's view with
    adapters off), and DMD2 freezes the fake score around the generator's GAN forward. A plain checkpoint recomputes a
    block in whatever state holds when the backward runs: under the student's adapter for a block that ran under the
    fake score's, or with the fake score trainable again. torch refuses the recomputation (other tensors saved) or,
    worse, it gives other values. The state (each adapter layer's active adapter and disabled flag, each weight's
    ``requires_grad``) is recorded when the block runs and put back around its recomputation.

    Raises:
        ValueError: the backbone has no ``enable_gradient_checkpointing``.
    """
    if not hasattr(backbone, "enable_gradient_checkpointing"):
        raise ValueError(f"{type(backbone).__name__} has no `enable_gradient_checkpointing()`.")
    from torch.utils.checkpoint import checkpoint

    def in_the_same_state(function: Any, *args: Any, **kwargs: Any) -> Any:
        adapters = [(layer, layer._active_adapter, layer._disable_adapters) for layer in tuner_layers(backbone)]
        block = function if isinstance(function, nn.Module) else nn.Module()
        frozen = {name: p.requires_grad for name, p in block.named_parameters()}

        def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
            return nullcontext(), _forward_state(adapters, block, frozen)

        return checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    backbone.enable_gradient_checkpointing(gradient_checkpointing_func=in_the_same_state)


@contextmanager
def _forward_state(
    adapters: list[tuple[nn.Module, Any, bool]], block: nn.Module, frozen: dict[str, bool]
) -> Iterator[None]:
    """Each adapter layer's ``(active adapter, disabled)`` and each of ``block``'s weights' ``requires_grad`` (by name:
    under FSDP the block holds its gathered weights by then, other tensors than in its forward call) set for the
    recomputation, restored afterwards."""
    before = [(layer._active_adapter, layer._disable_adapters) for layer, _, _ in adapters]
    params = [(p, frozen[name]) for name, p in block.named_parameters() if name in frozen]
    grads = [p.requires_grad for p, _ in params]
    for layer, active, disabled in adapters:
        layer.__dict__["_active_adapter"], layer.__dict__["_disable_adapters"] = active, disabled
    for p, flag in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for (layer, _, _), (active, disabled) in zip(adapters, before):
            layer.__dict__["_active_adapter"], layer.__dict__["_disable_adapters"] = active, disabled
        for (p, _), flag in zip(params, grads):
            p.requires_grad_(flag)


@contextmanager
def lora_merged(module: nn.Module, exact_restore: bool = True) -> Iterator[int]:
    """Merge the active LoRA adapter of every peft layer in ``module`` into its base weights for the block (peft's
    ``merge``, as diffusers' ``fuse_lora``), unmerged afterwards (even on error). Yields the number of merged layers.

    A merged layer runs one base matmul instead of base + adapter: the same function up to float rounding, faster.
    Layers whose adapters are disabled (a teacher view is active) are left alone; a teacher view entered inside the
    block makes peft unmerge the layers it runs through, which stays correct.

    Args:
        module: the network carrying the adapters (a LoRA student's backbone).
        exact_restore: keep a copy of each merged base weight and write it back afterwards, so the base is
            bit-identical after the block (``W + ΔW − ΔW`` is not ``W`` in float arithmetic, and in bf16 the error is
            about 1e-2 relative). Costs one extra copy of the adapted base weights while the block runs; ``False``
            subtracts ``ΔW`` again instead (no copy; fine for fp32 bases, ~1e-7 relative per use).
    """
    layers = [layer for layer in tuner_layers(module) if not layer.merged and not layer.disable_adapters]
    saved: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                if exact_restore:
                    base = layer.get_base_layer()
                    tensors = {n: getattr(base, n) for n in ("weight", "bias") if getattr(base, n, None) is not None}
                    saved.append((layer, {n: t.detach().clone() for n, t in tensors.items()}))
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            if exact_restore:
                for layer, originals in saved:
                    base = layer.get_base_layer()
                    for name, original in originals.items():
                        getattr(base, name).copy_(original)
                    layer.merged_adapters = []
            else:
                for layer in layers:
                    if layer.merged:
                        layer.unmerge()


@contextmanager
def held_in_eval(module: nn.Module) -> Iterator[None]:
    """``module`` and every submodule in eval mode for the block; each one's own train/eval flag is restored
    afterwards (``module.train(previous)`` would instead force one mode on all of them)."""
    flags = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in flags):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        if all(training for _, training in flags):
            module.train(True)
        else:
            for m, training in flags:
                m.training = training


class Student(nn.Module):
    """The trainable side. ``denoiser`` is what objectives call; ``is_lora`` tells how it shares the base."""

    def __init__(self, denoiser: Denoiser, is_lora: bool, lora_config: LoraConfig | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.is_lora = is_lora
        self.lora_config = lora_config

    @classmethod
    def full(cls, teacher: Teacher) -> Student:
        """A full fine-tune: an independent trainable copy of the teacher's backbone."""
        backbone = copy.deepcopy(teacher.denoiser.backbone)
        backbone.requires_grad_(True).train()
        d = teacher.denoiser
        return cls(Denoiser(backbone, d.schedule, d.prediction_type, d._adapter), is_lora=False)

    @classmethod
    def lora(
        cls,
        teacher: Teacher,
        rank: int = 64,
        alpha: float | None = None,
        target_modules: list[str] | str | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> Student:
        """A LoRA on the teacher's backbone; the teacher's view switches adapters off (no second base copy)."""
        backbone = teacher.denoiser.backbone
        targets = target_modules or _default_targets(backbone)
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=targets,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
        )
        if hasattr(backbone, "add_adapter"):  # diffusers ModelMixin: keeps peft_config for export metadata
            backbone.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, backbone, adapter_name=adapter_name)
        backbone.requires_grad_(False)
        for name, p in backbone.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        backbone.train()
        teacher.add_view(lambda: adapters_disabled(backbone))
        d = teacher.denoiser
        return cls(Denoiser(backbone, d.schedule, d.prediction_type, d._adapter), is_lora=True, lora_config=config)

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)

    @contextmanager
    def sampling(self, merge_lora: bool = True, exact_restore: bool = True) -> Iterator[Student]:
        """Sample with this student: eval mode once for the whole block and, for a LoRA student, its active adapter
        merged into the base weights (stock diffusers' ``fuse_lora()``); everything is restored afterwards.

        Samplers called inside find the model already in eval mode and switch nothing. Do not train inside the
        block: the merged base is the student, not the frozen teacher.

        Example:
            >>> with student.sampling():
            ...     images = objective.sampler()(noise, cond, num_steps=4)

        Args:
            merge_lora: merge a LoRA student's adapter when it is the only one on its base (False: eval mode only).
            exact_restore: see ``lora_merged``; the default writes the saved base weights back bit for bit.
        """
        backbone = self.denoiser.backbone
        # only a lone adapter is merged: with several on one base (DMD's fake score, Phased DMD's experts) the sampler
        # switches between them itself
        lone = len(getattr(backbone, "peft_config", None) or {}) == 1
        merged = lora_merged(backbone, exact_restore) if merge_lora and self.is_lora and lone else nullcontext()
        with held_in_eval(self), merged:
            yield self


def _default_targets(backbone: nn.Module) -> list[str]:
    names = {n for n, _ in backbone.named_modules()}
    kind = "unet" if "UNet" in type(backbone).__name__ else "transformer"
    targets = [t for t in DEFAULT_LORA_TARGETS[kind] if any(n.endswith(t) for n in names)]
    if targets:
        return targets
    linear = sorted({n.split(".")[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)})
    if not linear:
        raise ValueError(f"No Linear/Conv2d layers found in {type(backbone).__name__} to put LoRA adapters on.")
    return linear


def smaller_backbone(backbone: nn.Module, overrides: dict[str, Any]) -> nn.Module:
    """SlimFlow's smaller student: the teacher's diffusers class from its config with ``overrides`` (e.g.
    ``block_out_channels``), randomly initialised (it cannot start from the teacher)."""
    if not hasattr(type(backbone), "from_config"):
        raise ValueError(
            f"objective.student_backbone needs a diffusers backbone (it rebuilds the class from its config with the "
            f"overrides); got {type(backbone).__name__}. From Python pass `backbone=` (any module) instead."
        )
    unknown = sorted(set(overrides) - set(backbone.config))
    if unknown:
        raise ValueError(
            f"objective.student_backbone keys {unknown} are not in {type(backbone).__name__}'s config "
            f"(keys: {sorted(k for k in backbone.config if not k.startswith('_'))})."
        )
    param = next(backbone.parameters())
    small = type(backbone).from_config({**backbone.config, **overrides})
    return small.to(param.device).train().requires_grad_(True)  # from_config builds fp32 master weights


def num_parameters(module: nn.Module) -> int:
    """The number of parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
