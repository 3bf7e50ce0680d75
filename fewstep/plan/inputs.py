"""Example inputs for one backbone forward at a training shape: what the planner runs on the meta device to learn the
size of every block's output, and what the coefficient script runs on the tiny models.

Backbones fewstep trains go through their own adapter (``fewstep.models.backbones.BACKBONES``) with a
``Conditioning`` shaped from the backbone's config; the latent shape comes from ``latent_shape``. Wan runs through the
adapter of its family (``wan``, or ``wan_ti2v`` for TI2V-5B) with the first frame of the image-to-video families
(``wan_conditioning``). Backbones without an adapter yet (Qwen-Image) are called directly, with their shape rules here
until they get one.

``TEXT_TOKENS`` is the prompt length each family's pipeline feeds (padded to its maximum): CLIP 77 (SD1.5, SDXL),
CLIP 77 + T5 256 (SD3), T5 512 (FLUX.1-dev), umT5 512 (Wan 2.1), Qwen2.5-VL up to 512 (Qwen-Image), T5 300
(PixArt-Σ), Gemma 2 300 (Sana), T5 128 (LTX-Video).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models.backbones import ADAPTER_BY_CLASS, BACKBONES, WanExperts, latent_shape
from fewstep.models.conditioning import Conditioning

TEXT_TOKENS: dict[str, int] = {
    "UNet2DModel": 0,
    "UNet2DConditionModel": 77,
    "SD3Transformer2DModel": 333,
    "FluxTransformer2DModel": 512,
    "Flux2Transformer2DModel": 512,  # Mistral Small 3.1 tokens, padded to 512 (FLUX.2 [dev])
    "WanTransformer3DModel": 512,
    "QwenImageTransformer2DModel": 512,
    "PixArtTransformer2DModel": 300,
    "SanaTransformer2DModel": 300,
    "LTXVideoTransformer3DModel": 128,
    "ChromaTransformer2DModel": 512,  # T5 tokens, padded to 512 (ChromaPipeline's max_sequence_length)
    "ZImageTransformer2DModel": 512,  # Qwen3 tokens: ZImagePipeline drops the padding, 512 is the most a prompt has
    "HunyuanVideo15Transformer3DModel": 1000,  # Qwen2.5-VL tokens after the template (and HUNYUAN15_GLYPH_TOKENS)
}
HUNYUAN15_GLYPH_TOKENS = 256  # HunyuanVideo15Pipeline's tokenizer_2_max_length (ByT5)
VIDEO_FRAMES = 81  # Wan 2.1's default clip length (5 s at 16 fps)


@dataclass(frozen=True)
class TrainingShape:
    """One micro-batch as the backbone sees it: ``batch`` samples at ``resolution`` pixels (``frames`` for video)
    with ``text_tokens`` prompt tokens."""

    batch: int
    resolution: int
    text_tokens: int
    frames: int = VIDEO_FRAMES


def forward_network(backbone: nn.Module) -> nn.Module:
    """The network one forward of ``backbone`` runs through: Wan 2.2's high-noise expert for ``WanExperts`` (each
    sample goes through one expert, and the two have the same shapes), else the backbone itself."""
    return backbone.high if isinstance(backbone, WanExperts) else backbone


def default_text_tokens(backbone: nn.Module) -> int:
    """The family's prompt length (``TEXT_TOKENS``; 77 for an unknown text-conditioned backbone)."""
    return TEXT_TOKENS.get(type(backbone).__name__, 77)


def _conditioning(backbone: nn.Module, shape: TrainingShape, device: Any, dtype: torch.dtype) -> Conditioning:
    """A ``Conditioning`` with the widths the backbone's config asks for (random values; meta on the meta device)."""
    cfg, b, n = backbone.config, shape.batch, shape.text_tokens
    adapter = ADAPTER_BY_CLASS[type(backbone).__name__]

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, device=device, dtype=dtype)

    if adapter == "unet2d":
        classes = getattr(cfg, "num_class_embeds", None)
        return Conditioning(class_labels=torch.zeros(b, dtype=torch.long, device=device) if classes else None)
    if adapter == "unet2d_condition":
        cond = Conditioning(prompt_embeds=rand(b, n, int(cfg.cross_attention_dim)))
        if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 micro-conditioning ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond = cond.replace(pooled_prompt_embeds=rand(b, pooled), time_ids=rand(b, 6))
        if getattr(cfg, "time_cond_proj_dim", None):
            cond = cond.replace(timestep_cond=rand(b, cfg.time_cond_proj_dim))
        return cond
    if adapter in ("pixart", "sana", "ltx"):  # T5 / Gemma 2 tokens with their attention mask
        mask = torch.ones(b, n, dtype=torch.long, device=device)
        return Conditioning(prompt_embeds=rand(b, n, int(cfg.caption_channels)), prompt_embeds_mask=mask)
    if adapter == "chroma":  # T5 tokens with their mask; no pooled text, no guidance input
        mask = torch.ones(b, n, dtype=torch.long, device=device)
        return Conditioning(prompt_embeds=rand(b, n, cfg.joint_attention_dim), prompt_embeds_mask=mask)
    if adapter == "zimage":  # Qwen3 caption states, every token real (the adapter passes them as they are)
        return Conditioning(prompt_embeds=rand(b, n, int(cfg.cap_feat_dim)))
    if adapter == "hunyuan15":  # Qwen2.5-VL and ByT5 tokens, each with its mask (all real: the longest prompts)
        glyphs = HUNYUAN15_GLYPH_TOKENS
        return Conditioning(
            prompt_embeds=rand(b, n, cfg.text_embed_dim), prompt_embeds_mask=torch.ones(b, n, device=device).long(),
            prompt_embeds_2=rand(b, glyphs, cfg.text_embed_2_dim),
            prompt_embeds_mask_2=torch.ones(b, glyphs, device=device).long(),
        )  # fmt: skip
    if adapter == "flux2":  # three stacked Mistral layers, no pooled text; the embedded guidance (FLUX.2 [dev]: 4)
        cond = Conditioning(prompt_embeds=rand(b, n, cfg.joint_attention_dim))
        return cond.replace(guidance=torch.full((b,), 4.0, device=device)) if cfg.guidance_embeds else cond
    cond = Conditioning(
        prompt_embeds=rand(b, n, cfg.joint_attention_dim), pooled_prompt_embeds=rand(b, cfg.pooled_projection_dim)
    )
    if adapter == "flux" and getattr(cfg, "guidance_embeds", False):
        cond = cond.replace(guidance=torch.full((b,), 3.5, device=device))
    return cond


def _adapted(
    backbone: nn.Module, teacher: Any, shape: TrainingShape, device: Any, dtype: torch.dtype
) -> Callable[[], Any]:
    """A forward through fewstep's own adapter for the backbone's family."""
    x = torch.randn(latent_shape(teacher, shape.batch, shape.resolution, shape.frames), device=device, dtype=dtype)
    cond = _conditioning(backbone, shape, device, dtype)
    t = torch.full((shape.batch,), 500.0, device=device, dtype=dtype)
    adapter = BACKBONES.get(ADAPTER_BY_CLASS[type(backbone).__name__])
    return lambda: adapter(backbone, x, t, cond)


CLIP_IMAGE_TOKENS = 257  # Wan 2.1 I2V's CLIP ViT-H/14 at 224 px: 16 × 16 patches and the class token


def clip_image_tokens(pipeline: Any) -> int:
    """The CLIP vision tokens Wan 2.1 I2V's cross-attention sees: ``(image_size / patch_size)² + 1`` of the pipeline's
    image encoder config, else ``CLIP_IMAGE_TOKENS``."""
    config = getattr(getattr(pipeline, "image_encoder", None), "config", None)
    vision = getattr(config, "vision_config", config)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    return (int(size) // int(patch)) ** 2 + 1 if size and patch else CLIP_IMAGE_TOKENS


def wan_conditioning(
    backbone: nn.Module, teacher: Any, x_shape: tuple[int, ...], text_tokens: int, device: Any, dtype: torch.dtype
) -> Conditioning:
    """A Wan ``Conditioning`` for latents of ``x_shape`` ``[b, c, f, h, w]``: UMT5 tokens, and the first frame of the
    image-to-video families, shaped as ``fewstep.models.prompts.first_frame_conditioning`` makes it: Wan 2.1 I2V's
    condition latents (the frame mask and the frame's latents, ``in_channels − c`` channels) and CLIP image tokens;
    TI2V-5B's clean first latent frame (its tokens get their own timestep, as in training on first frames)."""
    cfg = backbone.config
    b, c, _, h, w = x_shape

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, device=device, dtype=dtype)

    cond = Conditioning(prompt_embeds=rand(b, text_tokens, int(cfg.text_dim)))
    if getattr(cfg, "image_dim", None):  # Wan 2.1 I2V: 36 input channels = 16 noisy + 20 of the first frame
        extra = int(cfg.in_channels) - c
        cond = cond.replace(condition_latents=rand(b, extra, *x_shape[2:]),
                            image_embeds=rand(b, clip_image_tokens(teacher.pipeline), int(cfg.image_dim)))  # fmt: skip
    if getattr(teacher, "family", None) == "wan22_ti2v":
        cond = cond.replace(first_frame_latents=rand(b, c, 1, h, w))
    return cond


def _wan(backbone: nn.Module, teacher: Any, shape: TrainingShape, device: Any, dtype: torch.dtype) -> Callable[[], Any]:
    """Wan 2.1 / 2.2 (and their image-to-video families) through fewstep's adapter: latents ``latent_shape`` gives
    (Wan 2.1: ``[b, 16, 1 + (frames − 1)/4, h/8, w/8]``; TI2V-5B: 48 channels at ``h/16, w/16``)."""
    b = shape.batch
    x = torch.randn(latent_shape(teacher, b, shape.resolution, shape.frames), device=device, dtype=dtype)
    cond = wan_conditioning(backbone, teacher, tuple(x.shape), shape.text_tokens, device, dtype)
    t = torch.full((b,), 500.0, device=device, dtype=dtype)
    adapter = BACKBONES.get("wan_ti2v" if getattr(teacher, "family", None) == "wan22_ti2v" else "wan")
    return lambda: adapter(backbone, x, t, cond)


def _qwen_image(
    backbone: nn.Module, teacher: Any, shape: TrainingShape, device: Any, dtype: torch.dtype
) -> Callable[[], Any]:
    """Qwen-Image: 16-channel latents at 1/8 of the pixels, packed in 2×2 patches (``in_channels`` = 64)."""
    cfg, b, n = backbone.config, shape.batch, shape.text_tokens
    side = shape.resolution // 16
    x = torch.randn(b, side * side, cfg.in_channels, device=device, dtype=dtype)
    text = torch.randn(b, n, cfg.joint_attention_dim, device=device, dtype=dtype)
    mask = torch.ones(b, n, device=device, dtype=torch.long)
    t = torch.full((b,), 0.5, device=device, dtype=dtype)
    kwargs = {"img_shapes": [[(1, side, side)]] * b, "return_dict": False}
    return lambda: backbone(
        hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t, **kwargs
    )[0]


# Backbones whose forward reads the values of its inputs, which the meta device does not have.
VALUE_DEPENDENT = {
    "HunyuanVideo15Transformer3DModel": "it tells text-to-video by all-zero vision tokens (a branch on their values) "
    "and gathers each sample's real text tokens by their masks (shapes that depend on values). Size the run with a "
    "short measured one on your hardware (train.max_steps=2) instead.",
}
DIRECT: dict[str, Callable[..., Callable[[], Any]]] = {
    "WanTransformer3DModel": _wan,
    "QwenImageTransformer2DModel": _qwen_image,
}


def backbone_forward(
    backbone: nn.Module, teacher: Any, shape: TrainingShape, device: Any = "meta", dtype: torch.dtype | None = None
) -> Callable[[], Any]:
    """A zero-argument callable running one forward of ``backbone`` at ``shape``.

    Args:
        backbone: a diffusers backbone (on the meta device for planning, or a real tiny one).
        teacher: its ``Teacher`` (``latent_shape`` reads its pipeline and family).
        shape: the micro-batch.
        device: where the inputs are made (``meta`` for planning).
        dtype: the inputs' dtype (default: the backbone's).

    Raises:
        ValueError: a backbone class with neither a fewstep adapter nor an entry in ``DIRECT``.
    """
    dtype = dtype or next(backbone.parameters()).dtype
    name = type(backbone).__name__
    if name in VALUE_DEPENDENT and torch.device(device).type == "meta":
        raise ValueError(f"`fewstep plan` cannot run {name} on the meta device: {VALUE_DEPENDENT[name]}")
    if name in DIRECT:
        return DIRECT[name](backbone, teacher, shape, device, dtype)
    if name in ADAPTER_BY_CLASS:
        return _adapted(backbone, teacher, shape, device, dtype)
    raise ValueError(
        f"`fewstep plan` cannot build example inputs for {name}; supported: "
        f"{', '.join(sorted({*ADAPTER_BY_CLASS, *DIRECT}))}."
    )
