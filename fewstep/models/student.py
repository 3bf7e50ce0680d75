"""``Student``: the trainable denoiser, a full fine-tune or a LoRA (peft) on the teacher's own base (DESIGN §3).

A LoRA student never holds a second copy of the base: adapters are injected into the teacher's backbone, the base
stays frozen, and the teacher gets the view "adapters disabled" (``Teacher.add_view``). A full student is a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
    ],
}


def tuner_layers(module: nn.Module) -> Iterator[nn.Module]:
    """The peft LoRA layers (``BaseTunerLayer``) inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft is imported on first use: it is slow to import

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            yield m


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its frozen base (every LoRA layer bypassed), restored afterwards (even on error).

    Only peft's ``_disable_adapters`` flag is flipped. ``requires_grad`` stays as it is: peft's ``enable_adapters``
    freezes every adapter when disabling and re-enables gradients only for the *active* one when enabling, which
    would freeze a second trainable adapter on the same base (DMD's fake score, Phased DMD's experts)."""
    layers = list(tuner_layers(module))
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer._disable_adapters = disabled


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
