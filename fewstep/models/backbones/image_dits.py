"""Latent DiTs that take latents as they are: SD3 / SD3.5, PixArt-Σ (learned σ) and Sana."""

from __future__ import annotations

from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
    text_mask,
)
from fewstep.models.conditioning import Conditioning


@BACKBONES.register("sd3")
def sd3_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``SD3Transformer2DModel``: the timestep is ``1000·s`` (``FlowSchedule(timestep_scale=1000)``)."""
    return backbone(
        hidden_states=x,
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "SD3"), x),
        pooled_projections=cast_like(require_field(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "SD3"), x),
        timestep=timestep,
        return_dict=False,
    )[0]


def learned_sigma_eps(out: Tensor, x: Tensor) -> Tensor:
    """The prediction of a backbone that also outputs its variance (``out_channels = 2 × latent channels``, PixArt):
    the first half of the channels, as the PixArt and Sana pipelines keep it; other outputs unchanged."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out


@BACKBONES.register("pixart")
def pixart_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``PixArtTransformer2DModel`` as ``PixArtSigmaPipeline`` calls it: the VP timestep index, the T5 tokens with
    their mask, no micro-conditions (``added_cond_kwargs`` resolution and aspect ratio ``None``: PixArt-Σ has none);
    the learned variance is dropped (``learned_sigma_eps``)."""
    out = backbone(
        x,
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "PixArt"), x),
        encoder_attention_mask=text_mask(cond, x),
        timestep=timestep,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    return learned_sigma_eps(out, x)


@BACKBONES.register("sana")
def sana_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``SanaTransformer2DModel`` as ``SanaPipeline`` calls it: ``timestep = 1000·s`` (``FlowSchedule(timestep_scale=
    1000)``) times the model's own ``timestep_scale``, Gemma's tokens with their mask; flow velocity out."""
    out = backbone(
        x,
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Sana"), x),
        encoder_attention_mask=text_mask(cond, x),
        timestep=timestep * float(getattr(backbone.config, "timestep_scale", 1.0)),
        return_dict=False,
    )[0]
    return learned_sigma_eps(out, x)
