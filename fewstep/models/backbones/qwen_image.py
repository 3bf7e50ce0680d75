"""Qwen-Image: FLUX.1's 2×2 packing, per-sample ``img_shapes``, and true CFG with the pipeline's norm rescale."""

from __future__ import annotations

from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.backbones.flux import pack_latents, unpack_latents
from fewstep.models.conditioning import Conditioning
from fewstep.noise.convert import rescale_to_norm


def qwen_image_shapes(b: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """``img_shapes`` of ``QwenImagePipeline`` for ``b`` latents of ``height × width``: one frame of
    ``(h/2)·(w/2)`` packed tokens each (the transformer's image RoPE grid)."""
    return [[(1, height // 2, width // 2)]] * b


@BACKBONES.register("qwen_image")
def qwen_image_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``QwenImageTransformer2DModel`` on unpacked latents ``[b, c, h, w]``; returns the unpacked velocity.

    As ``QwenImagePipeline`` calls it: ``timestep = t / 1000 = s`` (``FlowSchedule(timestep_scale=1)``), the text
    tokens with their mask (left out when every token is real, as the pipeline does) and ``img_shapes``.
    """
    b, _, h, w = x.shape
    mask = cond.prompt_embeds_mask
    if mask is not None and bool(mask.all()):
        mask = None
    out = backbone(
        hidden_states=pack_latents(x),
        timestep=timestep.to(x.dtype),
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Qwen-Image"), x),
        encoder_hidden_states_mask=None if mask is None else mask.to(x.device),
        img_shapes=qwen_image_shapes(b, h, w),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def qwen_true_cfg_rescale(guided: Tensor, cond_out: Tensor) -> Tensor:
    """Qwen-Image's true-CFG rescale: each packed token of the guided velocity is scaled back to the norm of the
    conditional one, ``ĝ = g · ‖v_c‖ / ‖g‖`` over the 4c values of its 2×2 patch (``QwenImagePipeline.__call__``).
    Unpacked ``[b, c, h, w]`` in and out."""
    _, _, h, w = guided.shape
    return unpack_latents(rescale_to_norm(pack_latents(guided), pack_latents(cond_out), dim=-1), h, w)
