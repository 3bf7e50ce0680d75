"""CogVideoX: video latents with frames before channels, 3-D rotary embeddings (5b)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    Adapted,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning

# The axis order of CogVideoX's latents ``[b, f, c, h, w]`` seen from fewstep's ``[b, c, f, h, w]`` (its own inverse).
COGVIDEOX_LAYOUT = (0, 2, 1, 3, 4)


def cogvideox_rotary_embeddings(backbone: nn.Module, shape: Sequence[int], device: Any) -> tuple[Tensor, Tensor] | None:
    """The 3-D rotary ``(cos, sin)`` of a CogVideoX 1.0 transformer with ``use_rotary_positional_embeddings`` (5b) for
    latents of ``shape`` ``[b, c, f, h, w]``, as ``CogVideoXPipeline._prepare_rotary_positional_embeddings``: the token
    grid ``(h/p, w/p)`` placed in the crop region of the grid the model was trained on (``sample_height × sample_width``
    latents), ``f`` positions in time. ``None`` for 2b, whose sin-cos positions the patch embedding adds itself."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    config = backbone.config
    if not config.use_rotary_positional_embeddings:
        return None
    p = int(config.patch_size)
    grid = (shape[-2] // p, shape[-1] // p)
    crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                   temporal_size=shape[-3], device=device)  # fmt: skip


def renoise_layout(denoiser: Adapted) -> tuple[int, ...] | None:
    """The axis order in which the family's pipeline has its scheduler draw fresh noise, as a permutation of fewstep's
    latent axes (``fewstep.solvers.samplers.fresh_noise``): CogVideoX's ``[b, f, c, h, w]`` (its ``scheduler.step``
    draws from the pipeline's generator in that shape); ``None`` where the pipeline draws in fewstep's own layout."""
    return COGVIDEOX_LAYOUT if denoiser.adapter_name == "cogvideox" else None


@BACKBONES.register("cogvideox")
def cogvideox_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``CogVideoXTransformer3DModel`` on video latents ``[b, c, f, h, w]``, as ``CogVideoXPipeline`` calls it: the
    latents in its ``[b, f, c, h, w]`` order (``COGVIDEOX_LAYOUT``; the output comes back in fewstep's), the VP
    timestep index, T5's ``prompt_embeds`` (padded, no mask: the pipeline passes none) and, for 5b, the rotary
    embeddings of the token grid (``cogvideox_rotary_embeddings``). v-prediction out."""
    out = backbone(
        hidden_states=x.permute(COGVIDEOX_LAYOUT),
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "CogVideoX"), x),
        timestep=timestep,
        image_rotary_emb=cogvideox_rotary_embeddings(backbone, x.shape, x.device),
        return_dict=False,
    )[0]
    return out.permute(COGVIDEOX_LAYOUT)
