"""The FLUX family: FLUX.1 (2×2-packed latents, guidance embedding), Chroma (FLUX.1's packing, T5 alone, a joint
attention mask) and FLUX.2 (patchified latents as tokens, 4-D position ids)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning


def pack_latents(x: Tensor) -> Tensor:
    """Flux's 2×2 patch packing: ``[b, c, h, w] -> [b, (h/2)·(w/2), 4c]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, -1, c * 4)  # [b, num_tokens, 4c]


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height × width`` (latent pixels, not image pixels)."""
    b, _, c4 = x.shape
    x = x.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Flux's positional ids of the packed image tokens, ``[(h/2)·(w/2), 3]`` = ``(0, row, col)`` for a latent of
    ``height × width`` (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@BACKBONES.register("flux")
def flux_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``FluxTransformer2DModel`` on unpacked latents ``[b, c, h, w]``; returns the unpacked velocity.

    As ``FluxPipeline`` calls it: ``timestep = t / 1000 = s`` (``FlowSchedule(timestep_scale=1)``; the model
    multiplies by 1000 itself) and ``guidance`` is the raw embedded guidance scale (e.g. 3.5), ``[b]`` float32.
    """
    b, _, h, w = x.shape
    prompt_embeds = cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Flux"), x)
    txt_ids = cond.txt_ids if cond.txt_ids is not None else x.new_zeros(prompt_embeds.shape[1], 3)
    img_ids = cond.img_ids if cond.img_ids is not None else flux_image_ids(h, w, x.device, x.dtype)
    guidance = None
    if getattr(backbone.config, "guidance_embeds", False):
        guidance = require_field(cond.guidance, "guidance", "Flux (guidance-distilled)")
        guidance = guidance.to(device=x.device, dtype=torch.float32).expand(b)
    out = backbone(
        hidden_states=pack_latents(x),
        timestep=timestep.to(x.dtype),
        guidance=guidance,
        pooled_projections=cast_like(require_field(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "Flux"), x),
        encoder_hidden_states=prompt_embeds,
        txt_ids=cast_like(txt_ids, x),
        img_ids=cast_like(img_ids, x),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def chroma_attention_mask(text_mask: Tensor, num_image_tokens: int, dtype: torch.dtype) -> Tensor:
    """``ChromaPipeline``'s joint mask ``[b, L + n]``: the T5 mask (the prompt's tokens and the first padding token,
    ``ChromaPipeline._get_t5_prompt_embeds``) followed by ``num_image_tokens`` ones (``_prepare_attention_mask``), in
    the float ``dtype`` the pipeline gives it. Each block multiplies it into a ``[b, 1, L + n, L + n]`` mask that
    attention adds to its scores (0 or 1): kept as the pipeline has it, so the teacher is the pipeline."""
    image = text_mask.new_ones(text_mask.shape[0], num_image_tokens)
    return torch.cat([text_mask, image], dim=1).to(dtype)


@BACKBONES.register("chroma")
def chroma_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``ChromaTransformer2DModel`` on unpacked latents ``[b, c, h, w]``; returns the unpacked velocity.

    As ``ChromaPipeline`` calls it: Flux's 2×2 packing and positions (``pack_latents``, ``flux_image_ids``; text at
    position 0), ``timestep = t / 1000 = s`` (``FlowSchedule(timestep_scale=1)``; the approximator embeds it, there
    is no guidance or pooled input), the T5 states with their mask over T5 padding (``chroma_attention_mask``).
    """
    b, _, h, w = x.shape
    prompt_embeds = cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Chroma"), x)
    text_mask = require_field(cond.prompt_embeds_mask, "prompt_embeds_mask", "Chroma").to(x.device)
    out = backbone(
        hidden_states=pack_latents(x),
        timestep=timestep.to(x.dtype),
        encoder_hidden_states=prompt_embeds,
        txt_ids=x.new_zeros(prompt_embeds.shape[1], 3),
        img_ids=flux_image_ids(h, w, x.device, x.dtype),
        attention_mask=chroma_attention_mask(text_mask, (h // 2) * (w // 2), x.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def flux2_position_ids(height: int, width: int, length: int = 1, device: Any = None) -> Tensor:
    """FLUX.2's 4-D positions ``(t, h, w, l)``, int64 as ``Flux2Pipeline`` builds them: the ``height × width`` image
    tokens of a latent at ``(0, row, col, 0)`` (``_prepare_latent_ids``), or, with ``height = width = 1``, ``length``
    text tokens at ``(0, 0, 0, l)`` (``_prepare_text_ids``). ``[height·width·length, 4]``."""
    axes = (torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(length))
    return torch.cartesian_prod(*axes).to(device)


@BACKBONES.register("flux2")
def flux2_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``Flux2Transformer2DModel`` on patchified latents ``[b, c, h, w]`` (the layout ``Flux2Pipeline`` draws its
    noise in: ``c`` = 4 × the VAE's channels); returns the velocity in the same layout.

    As ``Flux2Pipeline`` calls it: one token per latent pixel in row-major order (``_pack_latents``), ``timestep = t /
    1000 = s`` (``FlowSchedule(timestep_scale=1)``), ``guidance`` the raw embedded guidance scale (FLUX.2 [dev]: 4.0)
    ``[b]`` float32, the text tokens unmasked (the pipeline pads them to their full length and attends to all), and
    the 4-D positions of ``flux2_position_ids``.
    """
    b, c, h, w = x.shape
    prompt_embeds = cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "FLUX.2"), x)
    guidance = None
    if getattr(backbone.config, "guidance_embeds", False):
        guidance = require_field(cond.guidance, "guidance", "FLUX.2 (guidance-distilled)")
        guidance = guidance.to(device=x.device, dtype=torch.float32).expand(b)
    out = backbone(
        hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1),  # [b, h·w, c]
        timestep=timestep.to(x.dtype),
        guidance=guidance,
        encoder_hidden_states=prompt_embeds,
        txt_ids=flux2_position_ids(1, 1, prompt_embeds.shape[1], x.device),
        img_ids=flux2_position_ids(h, w, device=x.device),
        return_dict=False,
    )[0]
    return out.permute(0, 2, 1).reshape(b, -1, h, w)
