"""UNet backbones: ``UNet2DModel`` (pixel teachers) and ``UNet2DConditionModel`` (SD1.5, SDXL)."""

from __future__ import annotations

from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning


@BACKBONES.register("unet2d")
def unet2d_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``UNet2DModel`` (pixel teachers, class-conditional via ``class_labels``)."""
    labels = cast_like(cond.class_labels, x)
    return backbone(x, timestep, class_labels=labels, return_dict=False)[0]


@BACKBONES.register("unet2d_condition")
def unet2d_condition_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``UNet2DConditionModel`` (SD1.x/2.x; SDXL with ``added_cond_kwargs``; LCM with ``timestep_cond``)."""
    added = None
    if getattr(backbone.config, "addition_embed_type", None) == "text_time":  # SDXL micro-conditioning
        added = {
            "text_embeds": cast_like(require_field(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "SDXL"), x),
            "time_ids": cast_like(require_field(cond.time_ids, "time_ids", "SDXL"), x),
        }
    return backbone(
        x,
        timestep,
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "UNet2DCondition"), x),
        class_labels=cast_like(cond.class_labels, x),
        timestep_cond=cast_like(cond.timestep_cond, x),
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
