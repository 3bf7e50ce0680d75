"""HunyuanVideo 1.5: three token streams (Qwen2.5-VL, ByT5, SigLIP vision tokens) and condition channels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning

HUNYUAN15_VISION_TOKENS = 729  # HunyuanVideo15Pipeline's vision_num_semantic_tokens (SigLIP's 27 × 27), zero for t2v


@BACKBONES.register("hunyuan15")
def hunyuan15_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``HunyuanVideo15Transformer3DModel`` on video latents ``[b, c, f, h, w]``, as the HunyuanVideo 1.5 pipelines call
    it: the latents followed on the channels by the condition latents and their one-channel mask (``2c + 1``
    channels), ``timestep = 1000·s`` (``FlowSchedule(timestep_scale=1000)``), Qwen2.5-VL's tokens and ByT5's glyph
    tokens each with its mask (``cond.prompt_embeds``/``_mask``, ``cond.prompt_embeds_2``/``_mask_2``, the masks as
    float as the pipelines pass them), and vision tokens. Text-to-video (``HunyuanVideo15Pipeline``): zero condition
    latents and mask, all-zero vision tokens, which the transformer reads as text-to-video (it masks them out).
    Image-to-video (``HunyuanVideo15ImageToVideoPipeline``): ``cond.condition_latents`` ``[b, c + 1, f, h, w]`` (the
    first frame's latents, then zero frames, and the mask 1 on the first frame) and ``cond.image_embeds``, SigLIP's
    tokens of the first frame (``fewstep.models.prompts.first_frame_conditioning``). Velocity out, ``[b, c, f, h, w]``.
    """
    b, c, f, h, w = x.shape
    if backbone.config.in_channels != 2 * c + 1:
        raise ValueError(
            f"This HunyuanVideo 1.5 transformer takes {backbone.config.in_channels} input channels, not the "
            f"{2 * c + 1} of {c}-channel latents (latents, condition latents, mask)."
        )
    names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    streams = {
        n: require_field(getattr(cond, n), n, "HunyuanVideo 1.5").to(device=x.device, dtype=x.dtype) for n in names
    }
    condition = cond.condition_latents
    condition = x.new_zeros(b, c + 1, f, h, w) if condition is None else cast_like(condition, x)
    image = cond.image_embeds
    image = (
        x.new_zeros(b, HUNYUAN15_VISION_TOKENS, backbone.config.image_embed_dim)
        if image is None
        else cast_like(image, x)
    )
    return backbone(
        hidden_states=torch.cat([x, condition], dim=1),  # [b, 2c + 1, f, h, w]
        timestep=timestep.to(x.dtype),
        encoder_hidden_states=streams["prompt_embeds"],
        encoder_attention_mask=streams["prompt_embeds_mask"],
        encoder_hidden_states_2=streams["prompt_embeds_2"],
        encoder_attention_mask_2=streams["prompt_embeds_mask_2"],
        image_embeds=image,
        return_dict=False,
    )[0]
