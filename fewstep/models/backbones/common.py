"""What every backbone adapter shares: the ``BACKBONES`` registry, the class → adapter table, the protocols the
shape rules read, and the casting and checking of conditioning inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.registry import Registry

BackboneAdapter = Callable[[nn.Module, Tensor, Tensor, Conditioning], Tensor]
BACKBONES: Registry[BackboneAdapter] = Registry("backbone adapter")


@BACKBONES.register("custom")
def custom_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """A user's module called as ``module(x, timestep, **cond.extra)`` (plus ``class_labels`` if given)."""
    kwargs = dict(cond.extra)
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    return backbone(x, timestep, **kwargs)


class Adapted(Protocol):
    """What the shape rules read from a ``Denoiser``: its adapter's name and its backbone."""

    adapter_name: str
    backbone: nn.Module


class FromPipeline(Protocol):
    """What ``latent_shape`` reads from a ``Teacher``: its pipeline (or None) and its family."""

    pipeline: Any
    family: str


# Which adapter serves which diffusers model class (used by the loader and by ``adapter_for``).
ADAPTER_BY_CLASS: dict[str, str] = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux2",
    "QwenImageTransformer2DModel": "qwen_image",
    "ChromaTransformer2DModel": "chroma",
    "ZImageTransformer2DModel": "zimage",
    "WanTransformer3DModel": "wan",
    "WanExperts": "wan_experts",
    "LTXVideoTransformer3DModel": "ltx",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideo15Transformer3DModel": "hunyuan15",
}


def adapter_for(backbone: nn.Module) -> str:
    """The registered adapter name for a diffusers backbone instance (by class name)."""
    name = type(backbone).__name__
    if name not in ADAPTER_BY_CLASS:
        raise ValueError(
            f"No backbone adapter for {name!r}; supported: {', '.join(sorted(ADAPTER_BY_CLASS))}. "
            "Wrap other modules with Teacher.from_module(module, schedule, prediction_type, adapter=callable)."
        )
    return ADAPTER_BY_CLASS[name]


def cast_like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """Move a conditioning tensor to ``x``'s device; floating tensors also to its dtype."""
    if t is None:
        return None
    return t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else None)


def require_field(value: Any, field: str, family: str) -> Any:
    if value is None:
        raise ValueError(
            f"The {family} backbone needs `cond.{field}`; got None. Encode prompts with "
            "fewstep.models.prompts.encode_prompts(teacher, prompts)."
        )
    return value


def text_mask(cond: Conditioning, x: Tensor) -> Tensor | None:
    """The text tokens' mask (1 = real) on ``x``'s device; PixArt and Sana pass it on every call, all ones too."""
    return None if cond.prompt_embeds_mask is None else cond.prompt_embeds_mask.to(x.device)
