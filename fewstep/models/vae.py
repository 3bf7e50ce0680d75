"""Latents to images and back through a teacher's VAE, with each family's latent normalisation (scale and shift,
per-channel statistics, FLUX.2's patchified batch-norm statistics, LTX-Video's decode timestep) and the VAEs that
take one frame or one clip at a time. A teacher loaded without its VAE (training from a cache) loads it for the
moment (``vae_loaded``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fewstep.models.teacher import Teacher


@contextlib.contextmanager
def vae_loaded(teacher: Teacher) -> Iterator[Any]:
    """The teacher's VAE for the block (``None`` for pixel teachers). A teacher loaded without it (``load_teacher(cfg,
    encoders=False)``) gets it from disk onto its backbone's device for the block and lets it go afterwards, so
    training from a cache holds no VAE between sample grids. Nested blocks share one load."""
    pipe = teacher.pipeline
    vae = getattr(pipe, "vae", None) if pipe is not None else None
    if vae is not None or teacher.vae_loader is None:
        yield vae
        return
    param = next(teacher.denoiser.backbone.parameters())
    pipe.vae = teacher.vae_loader().to(param.device)
    try:
        yield pipe.vae
    finally:
        pipe.vae = None


def decode_latents(teacher: Teacher, x0: Tensor) -> Tensor:
    """Clean latents ``[b, c, h, w]`` to images ``[b, 3|1, H, W]`` in ``[0, 1]`` (float32); video latents ``[b, c, f,
    h, w]`` to videos ``[b, 3, F, H, W]``.

    Latent teachers: the VAE on ``x0 / scale + shift`` (``latent_normalization``; the VAE is loaded for the call if it
    was left on disk: wrap several calls in ``vae_loaded`` to load it once). Pixel teachers: ``(x0 + 1) / 2``.
    Gradients flow to ``x0`` if it requires them (the VAE itself is frozen).
    """
    with vae_loaded(teacher) as vae:
        return _decode(vae, x0)


def latent_normalization(vae: Any, like: Tensor) -> tuple[Any, Any]:
    """``(shift, scale)`` with ``normalised = (vae_latent − shift) · scale``, shaped to broadcast against ``like``.

    Image VAEs: ``shift_factor`` (0 if unset) and ``scaling_factor``. Video VAEs with per-channel statistics
    (Wan's ``AutoencoderKLWan``): ``latents_mean`` and ``1 / latents_std`` as ``[1, c, 1, 1, 1]``, as ``WanPipeline``.
    LTX-Video's ``AutoencoderKLLTXVideo`` keeps them in buffers: ``latents_mean`` and ``scaling_factor /
    latents_std``, as ``LTXPipeline._normalize_latents``.
    """
    config = vae.config
    if is_ltx_vae(vae):
        view = (1, -1) + (1,) * (like.ndim - 2)
        mean = vae.latents_mean.view(view).to(like.device, like.dtype)
        scale = (config.scaling_factor / vae.latents_std).view(view).to(like.device, like.dtype)
        return mean, scale
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        view = (1, len(config.latents_mean)) + (1,) * (like.ndim - 2)  # [1, c, 1, 1, 1]
        mean = torch.tensor(config.latents_mean).view(view).to(like.device, like.dtype)
        scale = 1.0 / torch.tensor(config.latents_std).view(view).to(like.device, like.dtype)
        return mean, scale
    return getattr(config, "shift_factor", None) or 0.0, config.scaling_factor


def _decode(vae: Any, x0: Tensor) -> Tensor:
    if vae is None:
        return ((x0.float() + 1) / 2).clamp(0, 1)
    if is_frame_vae(vae) and x0.ndim == 4:  # Qwen-Image: one frame of its video-style VAE
        return _decode(vae, x0[:, :, None])[:, :, 0]
    if is_flux2_vae(vae):
        return _decode_flux2(vae, x0)
    if is_one_clip_vae(vae) and x0.shape[0] > 1:
        return torch.cat([_decode(vae, clip) for clip in x0.split(1)])
    param = next(vae.parameters())
    x0 = x0.to(device=param.device, dtype=param.dtype)
    shift, scale = latent_normalization(vae, x0)
    args = (ltx_decode_timestep(vae, x0),) if is_ltx_vae(vae) else ()
    images = vae.decode(x0 / scale + shift, *args, return_dict=False)[0]  # [-1, 1]; video: [b, 3, f, H, W]
    return ((images.float() + 1) / 2).clamp(0, 1)


def encode_images(teacher: Teacher, images: Tensor) -> Tensor:
    """Images ``[b, 3, H, W]`` (videos ``[b, 3, F, H, W]``) in ``[-1, 1]`` to normalised latents ``(mean − shift) ·
    scale`` (``latent_normalization``: ``shift_factor`` / ``scaling_factor``, or Wan's per-channel statistics).

    Uses the posterior mean (deterministic). Pixel teachers return the images unchanged (float32).
    """
    vae = getattr(teacher.pipeline, "vae", None) if teacher.pipeline is not None else None
    if vae is None and teacher.vae_loader is not None:
        raise ValueError(
            "This teacher was loaded without its VAE (training from a cache), so it cannot encode images: the cache "
            "holds their latents already. Load it with load_teacher(cfg) to encode new images."
        )
    if vae is None:
        return images.float()
    return _encode(vae, images)


def _encode(vae: Any, images: Tensor) -> Tensor:
    if is_frame_vae(vae) and images.ndim == 4:  # Qwen-Image: one frame of its video-style VAE
        return _encode(vae, images[:, :, None])[:, :, 0]
    if is_flux2_vae(vae):
        return _encode_flux2(vae, images)
    if is_one_clip_vae(vae) and images.shape[0] > 1:
        return torch.cat([_encode(vae, clip) for clip in images.split(1)])
    param = next(vae.parameters())
    encoded = vae.encode(images.to(device=param.device, dtype=param.dtype))
    # KL VAEs give a posterior (its mean); Sana's deterministic DC-AE (AutoencoderDC) gives the latent itself
    mean = (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent).float()
    shift, scale = latent_normalization(vae, mean)
    return ((mean - shift) * scale).float()


def is_frame_vae(vae: Any) -> bool:
    """A video-style VAE used on single images (Qwen-Image's ``AutoencoderKLQwenImage``): ``[b, c, frames, h, w]``
    tensors and per-channel ``latents_mean`` / ``latents_std`` instead of one scaling factor."""
    return type(vae).__name__ == "AutoencoderKLQwenImage"


def is_one_clip_vae(vae: Any) -> bool:
    """HunyuanVideo 1.5's ``AutoencoderKLHunyuanVideo15``, which takes one clip at a time: its mid-block attention
    builds its causal mask as ``[b, L, L]`` against scores ``[b, 1, L, L]`` (diffusers 0.42), which fails for ``b > 1``.
    fewstep encodes and decodes such clips one by one (the pipeline decodes its whole batch at once)."""
    return type(vae).__name__ == "AutoencoderKLHunyuanVideo15"


def is_flux2_vae(vae: Any) -> bool:
    """FLUX.2's ``AutoencoderKLFlux2``: latents patchified 2×2 and normalised by its batch-norm statistics."""
    return type(vae).__name__ == "AutoencoderKLFlux2"


def _flux2_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The batch-norm ``running_mean`` and ``√(running_var + batch_norm_eps)`` of ``AutoencoderKLFlux2`` as ``[1, 4c,
    1, 1]`` on ``like``'s device and dtype: the statistics of the patchified latents ``Flux2Pipeline`` divides out."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def _decode_flux2(vae: Any, x0: Tensor) -> Tensor:
    """Normalised patchified latents ``[b, 4c, h, w]`` to images, as ``Flux2Pipeline`` decodes: ``x0·std + mean``,
    then each channel group of four back to its 2×2 patch ``[b, c, 2h, 2w]``."""
    param = next(vae.parameters())
    x0 = x0.to(device=param.device, dtype=param.dtype)
    mean, std = _flux2_stats(vae, x0)
    z = x0 * std + mean
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)
    images = vae.decode(z, return_dict=False)[0]  # [-1, 1]
    return ((images.float() + 1) / 2).clamp(0, 1)


def _encode_flux2(vae: Any, images: Tensor) -> Tensor:
    """Images ``[b, 3, H, W]`` in ``[-1, 1]`` to ``Flux2Pipeline``'s normalised latents: the posterior mean, each 2×2
    patch stacked on the channels (``[b, 4c, H/16, W/16]`` for FLUX.2's 8× VAE), minus ``mean``, over ``std``."""
    param = next(vae.parameters())
    z = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist.mean.float()
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    mean, std = _flux2_stats(vae, z)
    return ((z - mean) / std).float()


def is_ltx_vae(vae: Any) -> bool:
    """LTX-Video's ``AutoencoderKLLTXVideo``: latent statistics in buffers, a decoder that may take a timestep."""
    return type(vae).__name__ == "AutoencoderKLLTXVideo"


LTX_DECODE_TIMESTEP = 0.0  # LTXPipeline's default decode_timestep (and decode_noise_scale: no noise is mixed in)


def ltx_decode_timestep(vae: Any, latents: Tensor) -> Tensor | None:
    """The ``temb`` ``LTXPipeline`` decodes with: ``None`` for a decoder without timestep conditioning (LTX-Video
    0.9.0), else its default ``decode_timestep`` per sample; at 0 the pipeline's decode noise is scaled by 0."""
    if not vae.config.timestep_conditioning:
        return None
    return torch.full((latents.shape[0],), LTX_DECODE_TIMESTEP, device=latents.device, dtype=latents.dtype)
