"""The shape rules of every family: the latent shape a pipeline denoises (``latent_shape``,
``default_resolution``), the image tokens a backbone sees (``num_tokens``, which a resolution-dependent flow shift
reads), and the frame and side rules of video pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fewstep.models.backbones.common import (
    Adapted,
    FromPipeline,
)
from fewstep.models.backbones.zimage import ZIMAGE_DEFAULT_RESOLUTION, ZIMAGE_PATCH_SIZE


def num_tokens(denoiser: Adapted, shape: Sequence[int]) -> int | None:
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


def pixel_multiple(teacher: FromPipeline) -> int:
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
    teacher: FromPipeline, batch_size: int, resolution: int | None = None, num_frames: int | None = None
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


def pipeline_sigmas(pipeline: Any, num_inference_steps: int) -> list[float] | None:
    """The flow ``sigmas`` a pipeline hands its scheduler itself at ``num_inference_steps`` where its grid is not the
    scheduler's own ``set_timesteps(num_inference_steps)``: HunyuanVideo 1.5's ``linspace(1, 0, K + 1)[:-1]`` (both
    pipelines; float64, as they build them). ``None`` for every other pipeline (Flux's and FLUX.2's sigmas
    ``fewstep.solvers.grids.scheduler_taus`` computes from their dynamic shift)."""
    if not is_hunyuan15_pipeline(pipeline):
        return None
    return np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()


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


def pixel_frame_problem(teacher: FromPipeline, num_frames: int) -> str | None:
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


def video_size_problems(teacher: FromPipeline, num_frames: int | None, height: int, width: int) -> list[str]:
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
