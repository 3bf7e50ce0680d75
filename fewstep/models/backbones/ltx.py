"""LTX-Video: video latents packed into tokens, with the rotary position scale of the VAE and frame rate."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.backbones.shapes import video_compression
from fewstep.models.conditioning import Conditioning

LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate: with the VAE's compression, the rotary position scale
LTX_ROPE_SCALE = (8 / LTX_FRAME_RATE, 32.0, 32.0)  # LTX-Video's (8× temporal, 32× spatial VAE) at 25 fps


def ltx_rope_interpolation_scale(pipeline: Any, frame_rate: float = LTX_FRAME_RATE) -> tuple[float, float, float]:
    """``LTXPipeline``'s ``rope_interpolation_scale``: ``(temporal compression / frame_rate, spatial, spatial)``,
    the seconds and pixels between latent positions (LTX-Video: ``(8 / 25, 32, 32)``)."""
    temporal, spatial = video_compression(pipeline)
    return temporal / frame_rate, float(spatial), float(spatial)


def ltx_pack_latents(x: Tensor, patch_size: int = 1, patch_size_t: int = 1) -> Tensor:
    """``[b, c, f, h, w] -> [b, (f/p_t)·(h/p)·(w/p), c·p_t·p·p]`` (``LTXPipeline._pack_latents``)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // patch_size_t, patch_size_t, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def ltx_unpack_latents(x: Tensor, frames: int, height: int, width: int, patch_size: int = 1,
                       patch_size_t: int = 1) -> Tensor:  # fmt: skip
    """Inverse of ``ltx_pack_latents`` for ``frames × height × width`` tokens (after patching)."""
    b = x.shape[0]
    x = x.reshape(b, frames, height, width, -1, patch_size_t, patch_size, patch_size)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


@BACKBONES.register("ltx")
def ltx_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``LTXVideoTransformer3DModel`` on unpacked video latents ``[b, c, f, h, w]``; returns the unpacked velocity.

    As ``LTXPipeline`` calls it: latents packed by the backbone's ``patch_size`` / ``patch_size_t``, ``timestep =
    1000·s`` (``FlowSchedule(timestep_scale=1000)``), T5's ``prompt_embeds`` with their attention mask, the token grid
    (``num_frames``, ``height``, ``width``) and ``rope_interpolation_scale`` (``cond``'s ``[b, 3]``, the first row:
    a batch shares its frame rate; default LTX-Video's at 25 fps, ``(8 / 25, 32, 32)``). Positions come from the grid
    (no ``video_coords``), as in the pipeline.
    """
    b, _, f, h, w = x.shape
    p, p_t = int(backbone.config.patch_size), int(backbone.config.patch_size_t)
    mask = require_field(cond.prompt_embeds_mask, "prompt_embeds_mask", "LTX-Video")
    rope = cond.rope_interpolation_scale
    rope = LTX_ROPE_SCALE if rope is None else tuple(float(v) for v in rope[0].tolist())  # one clip rate a batch
    out = backbone(
        hidden_states=ltx_pack_latents(x, p, p_t),
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "LTX-Video"), x),
        timestep=timestep,
        encoder_attention_mask=mask.to(x.device),
        num_frames=f // p_t,
        height=h // p,
        width=w // p,
        rope_interpolation_scale=rope,
        return_dict=False,
    )[0]
    return ltx_unpack_latents(out, f // p_t, h // p, w // p, p, p_t)
