"""Backbone adapters for diffusers model families, registered in ``BACKBONES``.

An adapter is ``adapter(backbone, x, timestep, cond) -> raw output``: it knows one family's call signature, feeds
``timestep = schedule.model_timestep(τ)`` as the model expects it, and returns the native output
(``return_dict=False``, element ``[0]``) with the same shape as ``x``. Conditioning tensors are cast to the dtype of
``x`` (the backbone's dtype). Conversion of the output to ``(x̂0, ε̂)`` happens in ``Denoiser``.

========================  ===========================  ===============================================================
name                      model                        inputs
========================  ===========================  ===============================================================
``unet2d``                ``UNet2DModel``              ``sample``, ``timestep``, ``class_labels``
``unet2d_condition``      ``UNet2DConditionModel``     + ``encoder_hidden_states``, ``timestep_cond``,
                                                       ``added_cond_kwargs={text_embeds, time_ids}`` (SDXL)
``sd3``                   ``SD3Transformer2DModel``    ``hidden_states``, ``encoder_hidden_states``,
                                                       ``pooled_projections``, ``timestep`` (= 1000·s)
``flux``                  ``FluxTransformer2DModel``   packed 2×2 latents, ``timestep`` (= s), ``guidance``,
                                                       ``pooled_projections``, ``encoder_hidden_states``,
                                                       ``txt_ids``, ``img_ids``
``flux2``                 ``Flux2Transformer2DModel``  patchified latents as tokens, ``timestep`` (= s), ``guidance``,
                                                       ``encoder_hidden_states``, ``txt_ids``, ``img_ids`` (4-D)
``qwen_image``            ``QwenImageTransformer2DModel``  packed 2×2 latents, ``timestep`` (= s),
                                                       ``encoder_hidden_states`` (+ ``_mask``), ``img_shapes``
``chroma``                ``ChromaTransformer2DModel``  packed 2×2 latents (as Flux), ``timestep`` (= s), T5
                                                       ``encoder_hidden_states``, ``txt_ids``, ``img_ids``, the
                                                       joint ``attention_mask`` over text and image tokens
``zimage``                ``ZImageTransformer2DModel``  lists of ``[c, 1, h, w]`` latents and of unpadded Qwen3 caption
                                                       states, ``t`` (= 1 − s, reversed); output negated
``wan``                   ``WanTransformer3DModel``    video latents ``[b, c, f, h, w]``, ``encoder_hidden_states``
                                                       (UMT5), ``timestep`` (= 1000·s)
``wan_class``             ``WanTransformer3DModel``    pixel clips ``[b, c, f, h, w]``, the class label as one one-hot
                                                       text token (``text_dim`` = classes + null), ``timestep``
``wan_experts``           ``WanExperts`` (Wan 2.2)     as ``wan``; ``transformer`` at ``timestep ≥ boundary``,
                                                       ``transformer_2`` below it
``ltx``                   ``LTXVideoTransformer3DModel``  video latents packed into tokens, ``timestep`` (= 1000·s),
                                                       ``encoder_hidden_states`` (T5) + ``encoder_attention_mask``,
                                                       ``num_frames``/``height``/``width``,
                                                       ``rope_interpolation_scale``
``pixart``                ``PixArtTransformer2DModel``  latents, ``timestep`` (VP index), T5 ``encoder_hidden_states``
                                                       + ``encoder_attention_mask``; ε of a learned-σ output
``sana``                  ``SanaTransformer2DModel``   latents, ``timestep`` (= 1000·s · ``timestep_scale``), Gemma
                                                       ``encoder_hidden_states`` + ``encoder_attention_mask``
``cogvideox``             ``CogVideoXTransformer3DModel``  video latents as ``[b, f, c, h, w]``, ``timestep``
                                                       (VP index), T5 ``encoder_hidden_states``, 3-D rotary
                                                       embeddings (5b)
``hunyuan15``             ``HunyuanVideo15Transformer3DModel``  video latents with condition latents and mask on the
                                                       channels (zero, or the first frame's), ``timestep`` (=
                                                       1000·s), Qwen2.5-VL and ByT5 tokens with their masks,
                                                       vision tokens (zero, or SigLIP's of the first frame)
========================  ===========================  ===============================================================

The shape rules of each family live here too: the latent shape a pipeline denoises (``latent_shape``,
``default_resolution``) and the image tokens a backbone sees (``num_tokens``, which a resolution-dependent flow
shift reads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.noise.convert import rescale_to_norm
from fewstep.registry import Registry

BackboneAdapter = Callable[[nn.Module, Tensor, Tensor, Conditioning], Tensor]
BACKBONES: Registry[BackboneAdapter] = Registry("backbone adapter")


@BACKBONES.register("custom")
def custom_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """A user's module called as ``module(x, timestep, **cond.extra)`` (plus ``class_labels`` if given)."""
    kwargs = dict(cond.extra)
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    return backbone(x, timestep, **kwargs)


class _Adapted(Protocol):
    """What the shape rules read from a ``Denoiser``: its adapter's name and its backbone."""

    adapter_name: str
    backbone: nn.Module


class _FromPipeline(Protocol):
    """What ``latent_shape`` reads from a ``Teacher``: its pipeline (or None) and its family."""

    pipeline: Any
    family: str


# Which adapter serves which diffusers model class (used by the loader and by ``adapter_for``).
ADAPTER_BY_CLASS: dict[str, str] = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux2",
    "QwenImageTransformer2DModel": "qwen_image",
    "ChromaTransformer2DModel": "chroma",
    "ZImageTransformer2DModel": "zimage",
    "WanTransformer3DModel": "wan",
    "WanExperts": "wan_experts",
    "LTXVideoTransformer3DModel": "ltx",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideo15Transformer3DModel": "hunyuan15",
}


def adapter_for(backbone: nn.Module) -> str:
    """The registered adapter name for a diffusers backbone instance (by class name)."""
    name = type(backbone).__name__
    if name not in ADAPTER_BY_CLASS:
        raise ValueError(
            f"No backbone adapter for {name!r}; supported: {', '.join(sorted(ADAPTER_BY_CLASS))}. "
            "Wrap other modules with Teacher.from_module(module, schedule, prediction_type, adapter=callable)."
        )
    return ADAPTER_BY_CLASS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Shape rules
# ---------------------------------------------------------------------------------------------------------------------


def num_tokens(denoiser: _Adapted, shape: Sequence[int]) -> int | None:
    """The image tokens the backbone sees for a latent of ``shape`` ``[b, c, h, w]``; None where it has none.

    Flux, Qwen-Image and Chroma pack 2×2 latent patches (``pack_latents``): ``(h/2)·(w/2)``; SD3 patchifies by its
    ``patch_size``. This is the token count a resolution-dependent (dynamic) flow shift reads (Flux's ``μ``,
    ``FlowSchedule.mu``). Video latents ``[b, c, f, h, w]`` (Wan): ``video_tokens``.
    """
    if denoiser.adapter_name in ("wan", "wan_ti2v") and len(shape) == 5:
        return video_tokens(denoiser.backbone, shape)
    if denoiser.adapter_name == "flux2" and len(shape) == 4:  # one token per patchified latent pixel
        return shape[-2] * shape[-1]
    if denoiser.adapter_name == "zimage" and len(shape) == 4:  # ZImagePipeline's image_seq_len: (h/2)·(w/2)
        patch = patch_size("zimage", denoiser.backbone)
        return (shape[-2] // patch) * (shape[-1] // patch)
    if denoiser.adapter_name == "ltx" and len(shape) == 5:  # LTXPipeline's video_sequence_length: f·h·w latents
        return shape[-3] * shape[-2] * shape[-1]
    if len(shape) != 4 or denoiser.adapter_name not in ("flux", "sd3", "qwen_image", "chroma"):
        return None
    patch = patch_size(denoiser.adapter_name, denoiser.backbone)
    return (shape[-2] // patch) * (shape[-1] // patch)


def patch_size(family: str, backbone: Any) -> int:
    """The side of the latent patches one token covers: 2 for Flux (its 2×2 packing), SD3's ``patch_size``, and 1
    for backbones that take latents as they are (UNets); Chroma packs as Flux."""
    if family in ("flux", "qwen_image", "chroma"):
        return 2
    if family == "flux2":  # its VAE's 2×2 patchify: each latent of the teacher covers 2×2 VAE latents
        return 2
    if family in ("sd3", "sd35"):
        return int(getattr(backbone.config, "patch_size", 2))
    if family == "zimage":  # ZImagePipeline calls its transformer with the default patch_size=2
        return ZIMAGE_PATCH_SIZE
    if family in ("ltx", "cogvideox", "hunyuan15", "hunyuan15_i2v"):  # one int for height and width (and ``_t``)
        return int(backbone.config.patch_size)
    if family in VIDEO_FAMILIES or family == "wan_class":
        return int(backbone.config.patch_size[-1])  # (frames, height, width): Wan's (1, 2, 2)
    if family in ("pixart_sigma", "sana"):
        return int(backbone.config.patch_size)  # PixArt-Σ 2, Sana 1
    return 1


def pixel_multiple(teacher: _FromPipeline) -> int:
    """What every image side must be a multiple of: the VAE's downsampling × the backbone's ``patch_size`` (e.g. 8
    for SD1.5 / SDXL, 16 for SD3 and Flux; 1 for a pixel-space teacher without a pipeline)."""
    pipe = teacher.pipeline
    if pipe is None:
        return 1
    if teacher.family in VIDEO_FAMILIES:  # video VAEs name their factors per axis; also loaded without a VAE
        return video_compression(pipe)[1] * patch_size(teacher.family, pipeline_backbone(pipe))
    scale = int(pipe.vae_scale_factor) if getattr(pipe, "vae", None) is not None else 1
    return scale * patch_size(teacher.family, pipeline_backbone(pipe))


def pipeline_backbone(pipeline: Any) -> Any:
    """The denoising network of a diffusers pipeline: its ``transformer`` or its ``unet``."""
    for name in ("transformer", "unet"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipeline).__name__} has neither a `unet` nor a `transformer` component.")


def has_vae(pipeline: Any) -> bool:
    """Whether a pipeline denoises VAE latents: its ``vae`` is loaded, or listed but left on disk (a teacher loaded
    without its encoders, ``load_teacher(cfg, encoders=False)``)."""
    if pipeline is None:
        return False
    return getattr(pipeline, "vae", None) is not None or "vae" in getattr(pipeline, "config", {})


def default_resolution(pipeline: Any) -> int:
    """The image size (pixels) a pipeline generates by default (a video pipeline: its default height)."""
    if is_video_pipeline(pipeline) or hasattr(pipeline, "default_video_size"):
        return video_defaults(pipeline)[1]
    vae_scale = getattr(pipeline, "vae_scale_factor", 1) if has_vae(pipeline) else 1
    size = getattr(pipeline, "default_sample_size", None)
    if size is None and type(pipeline).__name__ == "ZImagePipeline":  # its __call__: height = height or 1024
        return ZIMAGE_DEFAULT_RESOLUTION
    if size is None:
        size = pipeline_backbone(pipeline).config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * int(vae_scale)


def latent_shape(
    teacher: _FromPipeline, batch_size: int, resolution: int | None = None, num_frames: int | None = None
) -> tuple[int, ...]:
    """``(b, c, h, w)`` of the (unpacked) latents the teacher denoises at ``resolution`` pixels; ``(b, c, f, h, w)``
    for a video teacher (``video_latent_shape``: ``num_frames`` frames, default the pipeline's)."""
    pipe = teacher.pipeline
    if pipe is None:
        raise ValueError("latent_shape needs a teacher loaded from a pipeline; for custom teachers use your shape.")
    if teacher.family in VIDEO_FAMILIES:
        return video_latent_shape(pipe, batch_size, resolution, num_frames)
    if teacher.family == "wan_class":
        return pixel_clip_shape(pipe, batch_size, resolution, num_frames)
    res = resolution or default_resolution(pipe)
    config = pipeline_backbone(pipe).config
    if teacher.family in ("flux", "qwen_image", "chroma"):  # packing needs an even latent size
        scale = pipe.vae_scale_factor
        return batch_size, config.in_channels // 4, 2 * (res // (scale * 2)), 2 * (res // (scale * 2))
    if teacher.family == "zimage":  # ZImagePipeline.prepare_latents: an even latent size, 2×2 patches
        side = 2 * (res // (pipe.vae_scale_factor * 2))
        return batch_size, config.in_channels, side, side
    if teacher.family == "flux2":  # Flux2Pipeline.prepare_latents: noise drawn already patchified 2×2
        side = res // (pipe.vae_scale_factor * 2)
        return batch_size, config.in_channels, side, side
    scale = pipe.vae_scale_factor if has_vae(pipe) else 1
    return batch_size, config.in_channels, res // scale, res // scale


# Video: latents [b, c, f, h, w]; the VAE keeps the first frame and compresses the rest in time (Wan 4×, LTX 8×),
# and compresses space (Wan 8×, LTX 32×).
VIDEO_FAMILIES = ("wan21", "wan21_i2v", "wan22", "wan22_ti2v", "ltx", "cogvideox", "hunyuan15", "hunyuan15_i2v")
WAN_DEFAULT_VIDEO = (81, 480, 832)  # WanPipeline's call defaults: frames, height, width (5 s at 16 fps, 480p)
LTX_DEFAULT_VIDEO = (161, 512, 704)  # LTXPipeline's call defaults (6.4 s at 25 fps)


def is_video_pipeline(pipeline: Any) -> bool:
    """Whether a pipeline generates video latents ``[b, c, f, h, w]`` (its VAE has a temporal factor: Wan's
    ``vae_scale_factor_temporal``, LTX's ``vae_temporal_compression_ratio``)."""
    return pipeline is not None and (
        hasattr(pipeline, "vae_scale_factor_temporal") or hasattr(pipeline, "vae_temporal_compression_ratio")
    )


def video_compression(pipeline: Any) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of a video pipeline's VAE: Wan ``(4, 8)``, LTX-Video ``(8, 32)``."""
    if hasattr(pipeline, "vae_temporal_compression_ratio"):  # LTXPipeline's names
        return int(pipeline.vae_temporal_compression_ratio), int(pipeline.vae_spatial_compression_ratio)
    return int(pipeline.vae_scale_factor_temporal), int(pipeline.vae_scale_factor_spatial)


def video_defaults(pipeline: Any) -> tuple[int, int, int]:
    """``(frames, height, width)`` a video pipeline generates by default: ``default_video_size`` if the pipeline has
    one (the tiny zoo records its own), else its call defaults (``LTX_DEFAULT_VIDEO``, ``WAN_DEFAULT_VIDEO``)."""
    default = LTX_DEFAULT_VIDEO if hasattr(pipeline, "vae_temporal_compression_ratio") else WAN_DEFAULT_VIDEO
    if is_cogvideox_pipeline(pipeline):
        default = cogvideox_video_defaults(pipeline)
    if is_hunyuan15_pipeline(pipeline):
        default = hunyuan15_video_defaults(pipeline)
    return tuple(getattr(pipeline, "default_video_size", None) or default)  # type: ignore[return-value]


def is_cogvideox_pipeline(pipeline: Any) -> bool:
    """Whether a pipeline denoises with a ``CogVideoXTransformer3DModel`` (``CogVideoXPipeline``)."""
    return type(getattr(pipeline, "transformer", None)).__name__ == "CogVideoXTransformer3DModel"


def cogvideox_video_defaults(pipeline: Any) -> tuple[int, int, int]:
    """``CogVideoXPipeline``'s call defaults, read from its transformer's config: ``sample_frames`` frames of
    ``sample_height × sample_width`` latents times the VAE's spatial factor (CogVideoX-2b and 5b: 49 × 480 × 720)."""
    config = pipeline.transformer.config
    spatial = video_compression(pipeline)[1]
    return int(config.sample_frames), int(config.sample_height) * spatial, int(config.sample_width) * spatial


def is_hunyuan15_pipeline(pipeline: Any) -> bool:
    """Whether a pipeline denoises with a ``HunyuanVideo15Transformer3DModel`` (``HunyuanVideo15Pipeline`` and
    ``HunyuanVideo15ImageToVideoPipeline``)."""
    return type(getattr(pipeline, "transformer", None)).__name__ == "HunyuanVideo15Transformer3DModel"


HUNYUAN15_FRAMES = 121  # HunyuanVideo15Pipeline's num_frames default (5 s at 24 fps)


def hunyuan15_video_defaults(pipeline: Any) -> tuple[int, int, int]:
    """``HunyuanVideo15Pipeline``'s call defaults: 121 frames at the 16:9 size its video processor picks for the
    transformer's ``target_size`` (480p: 480 × 848; 720p: 720 × 1280). The image-to-video pipeline picks the size of
    the first frame's aspect ratio instead; a clip prepared for fewstep has the size given with its first frame."""
    height, width = pipeline.video_processor.calculate_default_height_width(9, 16, pipeline.target_size)
    return HUNYUAN15_FRAMES, int(height), int(width)


def video_latent_shape(
    pipeline: Any, batch_size: int, resolution: int | tuple[int, int] | None = None, num_frames: int | None = None
) -> tuple[int, int, int, int, int]:
    """``(b, c, f, h, w)`` as ``WanPipeline.prepare_latents`` (``LTXPipeline``'s, before packing): ``f = (num_frames −
    1) // temporal + 1``, ``h, w`` = pixels / spatial (``video_compression``: Wan 4 and 8, LTX 8 and 32).
    ``resolution`` is a side (square) or ``(height, width)``; both default to ``video_defaults``."""
    frames, height, width = video_defaults(pipeline)
    frames = num_frames or frames
    if resolution is not None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    temporal, spatial = video_compression(pipeline)
    problem = frame_count_problem(pipeline, frames)  # WanPipeline would round with a warning
    if problem:
        raise ValueError(f"{problem[0].upper()}{problem[1:]}.")
    config = pipeline_backbone(pipeline).config
    channels = getattr(config, "out_channels", None) or config.in_channels  # Wan 2.1 I2V: 16 of its 36 are noise
    return batch_size, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial


def pixel_clip_shape(
    pipeline: Any, batch_size: int, resolution: int | tuple[int, int] | None = None, num_frames: int | None = None
) -> tuple[int, int, int, int, int]:
    """``(b, c, f, h, w)`` of a pixel video teacher (``wan_class``): the clip itself, no VAE. Frames and sides default
    to the clip size the teacher was trained on (``default_video_size``, from its directory's training record)."""
    recorded = getattr(pipeline, "default_video_size", None)
    if recorded is None and (resolution is None or num_frames is None):
        raise ValueError(
            "This pixel video teacher does not record the clip size it generates (fewstep_video.json with "
            "video_size: [frames, height, width] next to its model_index.json); set data.num_frames and "
            "data.resolution."
        )
    frames, height, width = recorded or (num_frames, 0, 0)
    if resolution is not None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    return batch_size, pipeline_backbone(pipeline).config.in_channels, num_frames or frames, height, width


def pixel_frame_problem(teacher: _FromPipeline, num_frames: int) -> str | None:
    """Why a pixel video teacher (``wan_class``) cannot take ``num_frames`` frames (None: it can): each token covers
    ``patch_size[0]`` whole frames."""
    per_token = int(pipeline_backbone(teacher.pipeline).config.patch_size[0])
    if num_frames % per_token == 0:
        return None
    below = num_frames // per_token * per_token
    valid = f"{below} or {below + per_token}" if below else str(per_token)
    return (
        f"{num_frames} frames are not whole tokens of the {teacher.family} backbone ({per_token} frames each): "
        f"use {valid}"
    )


def frame_count_problem(pipeline: Any, num_frames: int, family: str | None = None) -> str | None:
    """Why a video pipeline's VAE cannot take ``num_frames`` frames (None: it can). It keeps the first frame and
    compresses the rest by its temporal factor ``t`` (``video_compression``: Wan 4, LTX-Video 8): ``t·k + 1`` frames.
    The one frame-count rule of ``video_latent_shape`` and ``video_size_problems``; the message names the nearest
    valid counts."""
    temporal = video_compression(pipeline)[0]
    if (num_frames - 1) % temporal == 0:
        return None
    below = (num_frames - 1) // temporal * temporal + 1
    vae = f"the {family} VAE" if family else ("the LTX-Video VAE" if temporal == 8 else "the Wan VAE")
    return (
        f"{num_frames} frames do not fit {vae}, which keeps the first frame and compresses the rest {temporal}× in "
        f"time ({temporal}k + 1 frames): use {below} or {below + temporal}"
    )


def video_size_problems(teacher: _FromPipeline, num_frames: int | None, height: int, width: int) -> list[str]:
    """Why a video teacher cannot take clips of ``num_frames`` frames at ``height × width`` pixels (empty: it can).

    Frames: the VAE keeps the first frame and compresses the rest by its temporal factor ``t`` (the VAE config's
    ``scale_factor_temporal``, Wan: 4; ``temporal_compression_ratio``, LTX-Video: 8), so a clip has ``t·k + 1`` frames.
    Sides: multiples of the VAE's spatial factor × the backbone's patch (``pixel_multiple``). Each problem names the
    nearest valid values."""
    multiple = pixel_multiple(teacher)
    problem = frame_count_problem(teacher.pipeline, num_frames, teacher.family) if num_frames is not None else None
    problems = [problem] if problem else []
    sides = (("resolution", height),) if height == width else (("height", height), ("width", width))
    for name, side in sides:
        if side % multiple:
            below = side // multiple * multiple
            valid = f"{below} or {below + multiple}" if below else str(multiple)
            problems.append(
                f"{name} {side} is not a multiple of {multiple} (the {teacher.family} VAE's spatial factor × the "
                f"backbone's patch size): use {valid}"
            )
    return problems


def video_tokens(backbone: Any, shape: Sequence[int]) -> int:
    """Tokens of a video latent ``[b, c, f, h, w]``: ``(f / p_t)·(h / p_h)·(w / p_w)`` for the backbone's 3-D
    ``patch_size`` (Wan: ``(1, 2, 2)``)."""
    p_t, p_h, p_w = backbone.config.patch_size
    return (shape[-3] // p_t) * (shape[-2] // p_h) * (shape[-1] // p_w)


# ---------------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------------


def _as(t: Tensor | None, x: Tensor) -> Tensor | None:
    """Move a conditioning tensor to ``x``'s device; floating tensors also to its dtype."""
    if t is None:
        return None
    return t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else None)


def _require(value: Any, field: str, family: str) -> Any:
    if value is None:
        raise ValueError(
            f"The {family} backbone needs `cond.{field}`; got None. Encode prompts with "
            "fewstep.models.prompts.encode_prompts(teacher, prompts)."
        )
    return value


@BACKBONES.register("unet2d")
def unet2d_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``UNet2DModel`` (pixel teachers, class-conditional via ``class_labels``)."""
    labels = _as(cond.class_labels, x)
    return backbone(x, timestep, class_labels=labels, return_dict=False)[0]


@BACKBONES.register("unet2d_condition")
def unet2d_condition_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``UNet2DConditionModel`` (SD1.x/2.x; SDXL with ``added_cond_kwargs``; LCM with ``timestep_cond``)."""
    added = None
    if getattr(backbone.config, "addition_embed_type", None) == "text_time":  # SDXL micro-conditioning
        added = {
            "text_embeds": _as(_require(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "SDXL"), x),
            "time_ids": _as(_require(cond.time_ids, "time_ids", "SDXL"), x),
        }
    return backbone(
        x,
        timestep,
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "UNet2DCondition"), x),
        class_labels=_as(cond.class_labels, x),
        timestep_cond=_as(cond.timestep_cond, x),
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


@BACKBONES.register("sd3")
def sd3_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``SD3Transformer2DModel``: the timestep is ``1000·s`` (``FlowSchedule(timestep_scale=1000)``)."""
    return backbone(
        hidden_states=x,
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "SD3"), x),
        pooled_projections=_as(_require(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "SD3"), x),
        timestep=timestep,
        return_dict=False,
    )[0]


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
    prompt_embeds = _as(_require(cond.prompt_embeds, "prompt_embeds", "Flux"), x)
    txt_ids = cond.txt_ids if cond.txt_ids is not None else x.new_zeros(prompt_embeds.shape[1], 3)
    img_ids = cond.img_ids if cond.img_ids is not None else flux_image_ids(h, w, x.device, x.dtype)
    guidance = None
    if getattr(backbone.config, "guidance_embeds", False):
        guidance = _require(cond.guidance, "guidance", "Flux (guidance-distilled)")
        guidance = guidance.to(device=x.device, dtype=torch.float32).expand(b)
    out = backbone(
        hidden_states=pack_latents(x),
        timestep=timestep.to(x.dtype),
        guidance=guidance,
        pooled_projections=_as(_require(cond.pooled_prompt_embeds, "pooled_prompt_embeds", "Flux"), x),
        encoder_hidden_states=prompt_embeds,
        txt_ids=_as(txt_ids, x),
        img_ids=_as(img_ids, x),
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
    prompt_embeds = _as(_require(cond.prompt_embeds, "prompt_embeds", "Chroma"), x)
    text_mask = _require(cond.prompt_embeds_mask, "prompt_embeds_mask", "Chroma").to(x.device)
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
    prompt_embeds = _as(_require(cond.prompt_embeds, "prompt_embeds", "FLUX.2"), x)
    guidance = None
    if getattr(backbone.config, "guidance_embeds", False):
        guidance = _require(cond.guidance, "guidance", "FLUX.2 (guidance-distilled)")
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
    prompt_embeds = _as(_require(cond.prompt_embeds, "prompt_embeds", "Z-Image"), x)
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
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "Qwen-Image"), x),
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


@BACKBONES.register("wan")
def wan_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``WanTransformer3DModel`` on video latents ``[b, c, f, h, w]``: the timestep is ``1000·s``
    (``FlowSchedule(timestep_scale=1000)``), the text is UMT5's ``prompt_embeds`` as ``WanPipeline`` pads them.

    Inputs are cast to the patch embedding's dtype: Wan keeps some parameters in float32 in a bf16 model (its
    ``_keep_in_fp32_modules``, among them the first parameter, ``scale_shift_table``)."""
    x = x.to(backbone.patch_embedding.weight.dtype)
    return backbone(
        hidden_states=wan_input(backbone, x, cond),
        timestep=timestep,
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "Wan"), x),
        encoder_hidden_states_image=wan_image_embeds(backbone, x, cond),
        return_dict=False,
    )[0]


@BACKBONES.register("wan_class")
def wan_class_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """A class-conditional ``WanTransformer3DModel`` on pixel clips ``[b, c, f, h, w]`` (the moving-digits video
    teacher): its one text token is the one-hot class label over ``text_dim`` classes, the last being the null class
    of classifier-free guidance. The text projection turns it into a learned class embedding."""
    labels = _require(cond.class_labels, "class_labels", "class-conditional Wan").to(x.device).long().reshape(-1)
    if labels.numel() == 1 and x.shape[0] > 1:
        labels = labels.expand(x.shape[0])
    tokens = torch.nn.functional.one_hot(labels, backbone.config.text_dim).to(x.dtype)[:, None, :]
    return backbone(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens, return_dict=False)[0]


I2V_HINT = "Encode the first frames with fewstep.models.prompts.encode_prompts(teacher, prompts, images=...)."


def wan_input(backbone: nn.Module, x: Tensor, cond: Conditioning) -> Tensor:
    """What a Wan transformer takes as ``hidden_states``: the noisy latents ``[b, c, f, h, w]``, for Wan 2.1 I2V
    (``in_channels = 36``) followed on the channels by ``cond.condition_latents`` (the frame mask and the first
    frame's latents, ``WanImageToVideoPipeline``'s ``condition``)."""
    if cond.condition_latents is not None:
        x = torch.cat([x, _as(cond.condition_latents, x)], dim=1)  # [b, c + 4 + c, f, h, w]
    if x.shape[1] != backbone.config.in_channels:
        raise ValueError(
            f"This Wan transformer takes {backbone.config.in_channels} input channels but got {x.shape[1]}: an "
            f"image-to-video model needs `cond.condition_latents` (the first frame). {I2V_HINT}"
        )
    return x


def wan_image_embeds(backbone: nn.Module, x: Tensor, cond: Conditioning) -> Tensor | None:
    """Wan 2.1 I2V's CLIP image tokens (``cond.image_embeds``), required where the transformer has an ``image_dim``;
    ``None`` for text-to-video."""
    if getattr(backbone.config, "image_dim", None) is None:
        return None
    if cond.image_embeds is None:
        raise ValueError(f"This Wan image-to-video transformer needs `cond.image_embeds` (CLIP tokens). {I2V_HINT}")
    return _as(cond.image_embeds, x)


WAN_TIMESTEP_SCALE = 1000.0  # a Wan transformer's timestep is 1000·s (FlowSchedule(timestep_scale=1000))


@BACKBONES.register("wan_ti2v")
def wan_ti2v_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """Wan 2.2 TI2V-5B (``expand_timesteps``) on video latents ``[b, c, f, h, w]``.

    Text-to-video: as ``wan`` (``WanPipeline`` feeds the same timestep to every token). Image-to-video, as
    ``WanImageToVideoPipeline`` with ``expand_timesteps``: the first latent frame is replaced by
    ``cond.first_frame_latents`` and its tokens get timestep 0, the others ``timestep`` (one per token, ``[b, f·(h/2)·
    (w/2)]``). The pipeline overwrites that frame after every step; here its velocity is instead set to ``(x − x_img) /
    s``, so the flow prediction ``x̂0 = x − s·v`` of the first frame is the given frame itself: every sampler and
    objective sees a clean first frame (and no gradient through it), and sampling ends on it as the pipeline does.
    """
    first = cond.first_frame_latents
    if first is None:
        return wan_adapter(backbone, x, timestep, cond)
    x = x.to(backbone.patch_embedding.weight.dtype)
    first = _as(first, x)
    p_t, p_h, p_w = backbone.config.patch_size
    b, _, f, h, w = x.shape
    moving = torch.ones(b, f // p_t, h // p_h, w // p_w, device=x.device)  # [b, f', h', w'] tokens; 0: first frame
    moving[:, : first.shape[2] // p_t] = 0
    out = backbone(
        hidden_states=torch.cat([first, x[:, :, first.shape[2] :]], dim=2),
        timestep=(moving * timestep.float().view(-1, 1, 1, 1)).flatten(1),  # [b, tokens], float32 as the pipeline's
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "Wan"), x),
        return_dict=False,
    )[0]
    n = first.shape[2]
    s = (timestep.float() / WAN_TIMESTEP_SCALE).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
    v_first = (x[:, :, :n].float() - first.float()) / s  # x̂0 = x − s·v = x_img
    return torch.cat([v_first, out[:, :, n:].float()], dim=2)


WAN_EXPERT_COMPONENTS: dict[str, str] = {"transformer": "high", "transformer_2": "low"}  # pipeline component: expert


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one backbone: ``high`` (the pipeline's ``transformer``) denoises timesteps at or above
    ``boundary_timestep = boundary_ratio · num_train_timesteps``, ``low`` (``transformer_2``) those below, as
    ``WanPipeline`` switches them. ``config`` is the high-noise expert's (both share their shapes).

    Args:
        high: the high-noise expert (``pipe.transformer``).
        low: the low-noise expert (``pipe.transformer_2``).
        boundary_timestep: the switch, in the backbone's timestep units (Wan 2.2 T2V-A14B: 0.875 · 1000).
    """

    _supports_gradient_checkpointing = True  # each expert checkpoints its own blocks

    def __init__(self, high: nn.Module, low: nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        self.high, self.low = high, low
        self.boundary_timestep = float(boundary_timestep)

    @property
    def config(self) -> Any:
        return self.high.config

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Any = None) -> None:
        """diffusers' per-block gradient checkpointing on both experts, with the same checkpoint function."""
        for expert in (self.high, self.low):
            expert.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> WanExperts:
        """The experts of a Wan 2.2 ``WanPipeline`` (``transformer``, ``transformer_2``, ``boundary_ratio``)."""
        ratio = pipeline.config.boundary_ratio
        return cls(pipeline.transformer, pipeline.transformer_2, ratio * pipeline.scheduler.config.num_train_timesteps)


def is_wan_experts_pipeline(pipeline: Any) -> bool:
    """Whether a pipeline is Wan 2.2 with two experts (a ``transformer_2`` and a ``boundary_ratio``)."""
    config = getattr(pipeline, "config", {})
    return getattr(pipeline, "transformer_2", None) is not None and config.get("boundary_ratio") is not None


def is_wan_image_pipeline(pipeline: Any) -> bool:
    """Whether a Wan pipeline generates from a first frame (``WanImageToVideoPipeline``: it registers an
    ``image_encoder``, loaded or not)."""
    return "image_encoder" in getattr(pipeline, "config", {})


@BACKBONES.register("wan_experts")
def wan_experts_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``WanExperts``: each sample goes to the expert of its timestep (``≥ boundary``: high-noise, else low-noise);
    a batch on both sides of the boundary runs both experts, each on its own samples."""
    high = timestep >= backbone.boundary_timestep  # [b] bool, as WanPipeline's `t >= boundary_timestep`
    if bool(high.all()):
        return wan_adapter(backbone.high, x, timestep, cond)
    if not bool(high.any()):
        return wan_adapter(backbone.low, x, timestep, cond)
    idx_high, idx_low = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
    out_high = wan_adapter(backbone.high, x[idx_high], timestep[idx_high], cond.index(idx_high))
    out_low = wan_adapter(backbone.low, x[idx_low], timestep[idx_low], cond.index(idx_low))
    out = out_high.new_empty((x.shape[0], *out_high.shape[1:]))
    out[idx_high], out[idx_low] = out_high, out_low
    return out


# ---------------------------------------------------------------------------------------------------------------------
# LTX-Video: video latents packed into tokens
# ---------------------------------------------------------------------------------------------------------------------

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
    mask = _require(cond.prompt_embeds_mask, "prompt_embeds_mask", "LTX-Video")
    rope = cond.rope_interpolation_scale
    rope = LTX_ROPE_SCALE if rope is None else tuple(float(v) for v in rope[0].tolist())  # one clip rate a batch
    out = backbone(
        hidden_states=ltx_pack_latents(x, p, p_t),
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "LTX-Video"), x),
        timestep=timestep,
        encoder_attention_mask=mask.to(x.device),
        num_frames=f // p_t,
        height=h // p,
        width=w // p,
        rope_interpolation_scale=rope,
        return_dict=False,
    )[0]
    return ltx_unpack_latents(out, f // p_t, h // p, w // p, p, p_t)


# ---------------------------------------------------------------------------------------------------------------------
# CogVideoX: video latents with frames before channels
# ---------------------------------------------------------------------------------------------------------------------

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


def renoise_layout(denoiser: _Adapted) -> tuple[int, ...] | None:
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
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "CogVideoX"), x),
        timestep=timestep,
        image_rotary_emb=cogvideox_rotary_embeddings(backbone, x.shape, x.device),
        return_dict=False,
    )[0]
    return out.permute(COGVIDEOX_LAYOUT)


def learned_sigma_eps(out: Tensor, x: Tensor) -> Tensor:
    """The prediction of a backbone that also outputs its variance (``out_channels = 2 × latent channels``, PixArt):
    the first half of the channels, as the PixArt and Sana pipelines keep it; other outputs unchanged."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out


def _text_mask(cond: Conditioning, x: Tensor) -> Tensor | None:
    """The text tokens' mask (1 = real) on ``x``'s device; PixArt and Sana pass it on every call, all ones too."""
    return None if cond.prompt_embeds_mask is None else cond.prompt_embeds_mask.to(x.device)


@BACKBONES.register("pixart")
def pixart_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``PixArtTransformer2DModel`` as ``PixArtSigmaPipeline`` calls it: the VP timestep index, the T5 tokens with
    their mask, no micro-conditions (``added_cond_kwargs`` resolution and aspect ratio ``None``: PixArt-Σ has none);
    the learned variance is dropped (``learned_sigma_eps``)."""
    out = backbone(
        x,
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "PixArt"), x),
        encoder_attention_mask=_text_mask(cond, x),
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
        encoder_hidden_states=_as(_require(cond.prompt_embeds, "prompt_embeds", "Sana"), x),
        encoder_attention_mask=_text_mask(cond, x),
        timestep=timestep * float(getattr(backbone.config, "timestep_scale", 1.0)),
        return_dict=False,
    )[0]
    return learned_sigma_eps(out, x)


# ---------------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5: three token streams, condition channels
# ---------------------------------------------------------------------------------------------------------------------

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
    streams = {n: _require(getattr(cond, n), n, "HunyuanVideo 1.5").to(device=x.device, dtype=x.dtype) for n in names}
    condition = cond.condition_latents
    condition = x.new_zeros(b, c + 1, f, h, w) if condition is None else _as(condition, x)
    image = cond.image_embeds
    image = x.new_zeros(b, HUNYUAN15_VISION_TOKENS, backbone.config.image_embed_dim) if image is None else _as(image, x)
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
