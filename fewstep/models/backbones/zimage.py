"""Z-Image: lists of per-sample latents and unpadded caption states, the reversed timestep ``1 − s`` and a negated
output."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning

ZIMAGE_PATCH_SIZE = 2  # the patch_size ZImagePipeline calls its transformer with (its forward's default)
ZIMAGE_DEFAULT_RESOLUTION = 1024  # ZImagePipeline.__call__'s default height and width


@BACKBONES.register("zimage")
def zimage_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``ZImageTransformer2DModel`` on latents ``[b, c, h, w]``; returns the velocity ``ε − x0`` in the same layout.

    As ``ZImagePipeline`` calls it: a list of ``b`` latents ``[c, 1, h, w]`` (one frame each), the reversed timestep
    ``t = (1000 − 1000·s) / 1000`` (the pipeline's ``(1000 - timestep) / 1000``, here on
    ``FlowSchedule(timestep_scale=1000)``; the model multiplies it by its ``t_scale``), and each prompt's caption
    states without padding (the real tokens of ``prompt_embeds_mask``). The model predicts ``x0 − ε``; the pipeline
    negates it before its Euler step, and so does this adapter.
    """
    b = x.shape[0]
    prompt_embeds = cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Z-Image"), x)
    mask = cond.prompt_embeds_mask
    if mask is None:
        captions = list(prompt_embeds.unbind(0))
    else:
        captions = [pe[m.to(pe.device).bool()] for pe, m in zip(prompt_embeds, mask, strict=True)]
    out = backbone(
        list(x.unsqueeze(2).unbind(0)),  # b × [c, 1, h, w]
        ((1000 - timestep) / 1000).expand(b),  # float32, as the pipeline passes it
        captions,
        patch_size=ZIMAGE_PATCH_SIZE,
        return_dict=False,
    )[0]
    return -torch.stack(out).squeeze(2)
