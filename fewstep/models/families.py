"""Which family a diffusers pipeline is, and what that family's teacher takes from it: the backbone adapter, the flow
timestep scale, the schedule and prediction type from its scheduler, and the guidance options of its pipeline
(Z-Image's CFG normalisation and truncation, Wan 2.2's per-expert scale). Variants fewstep cannot reproduce are
refused by name here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fewstep.models.backbones import is_wan_experts_pipeline, is_wan_image_pipeline, pipeline_backbone
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import cap_to_norm
from fewstep.noise.schedules import FlowSchedule, VPSchedule

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "unet2d", "sd35", "qwen_image", "wan21", "wan21_i2v", "wan22",
            "wan22_ti2v", "ltx", "pixart_sigma", "sana", "wan_class", "cogvideox", "flux2", "chroma",
            "zimage", "hunyuan15", "hunyuan15_i2v")  # fmt: skip
ADAPTER_BY_FAMILY = {"sd15": "unet2d_condition", "sdxl": "unet2d_condition", "sd3": "sd3", "flux": "flux",
                     "unet2d": "unet2d", "sd35": "sd3", "qwen_image": "qwen_image", "wan21": "wan",
                     "wan21_i2v": "wan", "wan22": "wan_experts", "wan22_ti2v": "wan_ti2v", "ltx": "ltx",
                     "pixart_sigma": "pixart", "sana": "sana", "wan_class": "wan_class",
                     "cogvideox": "cogvideox", "flux2": "flux2", "chroma": "chroma", "zimage": "zimage",
                     "hunyuan15": "hunyuan15", "hunyuan15_i2v": "hunyuan15"}  # fmt: skip
# What a flow backbone is fed: SD3 / SD3.5, Wan, LTX-Video (and pixel UNets trained with FlowMatchEuler timesteps)
# 1000·s; Flux, FLUX.2, Chroma and Qwen-Image s (their pipelines divide by 1000 and the models multiply back); Sana
# 1000·s (its adapter also applies the model's own timestep_scale); Z-Image 1000·s (its adapter reverses it as its
# pipeline does).
FLOW_TIMESTEP_SCALE = {"sd3": 1000.0, "flux": 1.0, "unet2d": 1000.0, "sd35": 1000.0, "qwen_image": 1.0,
                       "wan21": 1000.0, "wan21_i2v": 1000.0, "wan22": 1000.0, "wan22_ti2v": 1000.0,
                       "ltx": 1000.0, "sana": 1000.0, "wan_class": 1000.0, "flux2": 1.0,
                       "chroma": 1.0, "zimage": 1000.0, "hunyuan15": 1000.0, "hunyuan15_i2v": 1000.0}  # fmt: skip


def detect_family(pipeline: Any) -> str:
    """``sd15`` | ``sdxl`` | ``sd3`` | ``sd35`` | ``flux`` | ``qwen_image`` | ``unet2d`` | ``wan21`` | ``wan21_i2v``
    (image-to-video) | ``wan22`` (two experts) | ``wan22_ti2v`` (TI2V-5B, ``expand_timesteps``) | ``ltx`` |
    ``pixart_sigma`` | ``sana`` | ``wan_class`` (a class-conditional Wan transformer on pixel clips, in a pipeline
    without a text encoder: the moving-digits teacher) | ``cogvideox`` (CogVideoX 1.0 text-to-video, 2b and 5b) |
    ``flux2`` (FLUX.2 [dev]) | ``chroma`` | ``zimage`` (Z-Image, Z-Image-Turbo) | ``hunyuan15`` (HunyuanVideo 1.5
    text-to-video) | ``hunyuan15_i2v`` (its image-to-video pipeline) from a pipeline's backbone class and config.

    Stable Diffusion 3.5 shares SD3's classes; its transformer is told apart by its RMS-normalised queries and keys
    (``qk_norm``, set in 3.5 Large, Large Turbo and Medium, absent in SD3 Medium)."""
    backbone = pipeline_backbone(pipeline)
    cls = type(backbone).__name__
    if cls == "FluxTransformer2DModel":
        return "flux"
    if cls == "Flux2Transformer2DModel":
        if "is_distilled" in getattr(pipeline, "config", {}):  # Flux2KleinPipeline registers it
            raise ValueError(
                "FLUX.2 [klein] (Flux2KleinPipeline: a Qwen3 text encoder, true CFG) is not supported; FLUX.2 [dev] "
                "(Flux2Pipeline) is."
            )
        return "flux2"
    if cls == "SD3Transformer2DModel":
        return "sd35" if getattr(backbone.config, "qk_norm", None) else "sd3"
    if cls == "QwenImageTransformer2DModel":
        return "qwen_image"
    if cls == "ChromaTransformer2DModel":
        return "chroma"
    if cls == "ZImageTransformer2DModel":
        return zimage_family(backbone.config)
    if cls == "UNet2DConditionModel":
        return "sdxl" if getattr(backbone.config, "addition_embed_type", None) == "text_time" else "sd15"
    if cls == "UNet2DModel":
        return "unet2d"
    if cls == "WanTransformer3DModel":
        if "text_encoder" not in getattr(pipeline, "config", {}):  # pixel clips, a one-hot class token: no text
            return "wan_class"
        if getattr(pipeline, "config", {}).get("expand_timesteps"):
            if is_wan_experts_pipeline(pipeline):
                raise ValueError(
                    "A Wan pipeline with both expand_timesteps and two experts is not supported; Wan 2.2 TI2V-5B "
                    "(expand_timesteps, one transformer) and T2V-A14B (two experts) are."
                )
            return "wan22_ti2v"  # text-to-video and, given a first frame, image-to-video
        if is_wan_image_pipeline(pipeline):
            if is_wan_experts_pipeline(pipeline) or getattr(backbone.config, "image_dim", None) is None:
                raise ValueError(
                    "Wan 2.2 image-to-video A14B (two experts, no CLIP image encoder) is not supported; Wan 2.1 I2V "
                    "(WanImageToVideoPipeline with a CLIP image encoder) is."
                )
            return "wan21_i2v"
        return "wan22" if is_wan_experts_pipeline(pipeline) else "wan21"
    if cls == "LTXVideoTransformer3DModel":
        return "ltx"
    if cls == "PixArtTransformer2DModel":
        if getattr(backbone, "use_additional_conditions", False):
            raise ValueError(
                "PixArt-α at 1024 px (resolution and aspect-ratio micro-conditions) is not supported; PixArt-Σ "
                "(PixArtSigmaPipeline, use_additional_conditions: false) is."
            )
        return "pixart_sigma"
    if cls == "SanaTransformer2DModel":
        if getattr(backbone.config, "guidance_embeds", False):
            raise ValueError(
                "Sana Sprint (guidance embedding, TrigFlow timesteps) is already a few-step model and not supported "
                "as a teacher; Sana (SanaPipeline) is."
            )
        return "sana"
    if cls == "CogVideoXTransformer3DModel":
        return cogvideox_family(backbone.config)
    if cls == "HunyuanVideo15Transformer3DModel":
        return hunyuan15_family(pipeline)
    raise ValueError(
        f"Cannot tell the model family of {type(pipeline).__name__} (backbone {cls}); supported backbones: "
        "UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel, Flux2Transformer2DModel, "
        "QwenImageTransformer2DModel, WanTransformer3DModel, PixArtTransformer2DModel, SanaTransformer2DModel, "
        "LTXVideoTransformer3DModel, CogVideoXTransformer3DModel, ChromaTransformer2DModel, ZImageTransformer2DModel, "
        "HunyuanVideo15Transformer3DModel. For other models use "
        "Teacher.from_module(module, schedule, prediction_type, adapter=...)."
    )


def hunyuan15_family(pipeline: Any) -> str:
    """``hunyuan15`` for ``HunyuanVideo15Pipeline`` (text-to-video), ``hunyuan15_i2v`` for
    ``HunyuanVideo15ImageToVideoPipeline`` (a SigLIP image encoder), each with a classifier-free guider the teacher
    reproduces (Imagen's convention over every step, no rescale). The step-distilled MeanFlow transformers
    (``use_meanflow``: a second timestep) are refused by name, as is a guider of another kind or setting."""
    if getattr(pipeline.transformer.config, "use_meanflow", False):
        raise ValueError(
            "The step-distilled HunyuanVideo 1.5 transformers (use_meanflow: a second timestep) are already few-step "
            "models and not supported as teachers; HunyuanVideo 1.5 text-to-video (480p_t2v, 720p_t2v) is."
        )
    problem = hunyuan15_guider_problem(getattr(pipeline, "guider", None))
    if problem:
        raise ValueError(problem)
    return "hunyuan15_i2v" if "image_encoder" in getattr(pipeline, "config", {}) else "hunyuan15"


def hunyuan15_guider_problem(guider: Any) -> str | None:
    """Why the teacher cannot reproduce a HunyuanVideo 1.5 pipeline's guider (None: it can). Its CFG is
    ``ClassifierFreeGuidance`` in Imagen's convention ``v_u + w·(v_c − v_u)`` at every step, the scale being
    ``teacher.guidance_scale``; a rescale, the original formulation or a step window are not reproduced."""
    if guider is None:
        return None
    config = dict(getattr(guider, "config", {}))
    changed = {
        key: config.get(key)
        for key, default in HUNYUAN15_GUIDER_DEFAULTS.items()
        if config.get(key, default) != default
    }
    if type(guider).__name__ == "ClassifierFreeGuidance" and not changed:
        return None
    return (
        f"This HunyuanVideo 1.5 pipeline guides with {type(guider).__name__} {changed or ''}; the teacher reproduces "
        "ClassifierFreeGuidance with guidance_rescale 0, use_original_formulation false, start 0 and stop 1 (its "
        "scale is teacher.guidance_scale). Set pipe.guider = ClassifierFreeGuidance(guidance_scale=...) and save it."
    )


HUNYUAN15_GUIDER_DEFAULTS = {"guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0, "stop": 1.0,
                             "enabled": True}  # fmt: skip


def cogvideox_family(config: Any) -> str:
    """``cogvideox`` for CogVideoX 1.0 text-to-video (2b, 5b); the image- and video-conditioned transformers (more
    input than output channels: the first frame's latents on the channels) and CogVideoX 1.5 (``patch_size_t``, frame
    padding, ``ofs`` embedding) are refused by name."""
    if config.in_channels != config.out_channels:
        raise ValueError(
            f"This CogVideoX transformer takes {config.in_channels} input channels for {config.out_channels} output "
            "channels (image-to-video or a control model: conditioning latents on the channels), which is not "
            "supported; CogVideoX text-to-video (CogVideoXPipeline: THUDM/CogVideoX-2b, THUDM/CogVideoX-5b) is."
        )
    if config.patch_size_t is not None:
        raise ValueError(
            "CogVideoX 1.5 (patch_size_t, frames padded to whole temporal patches) is not supported; CogVideoX 1.0 "
            "(THUDM/CogVideoX-2b, THUDM/CogVideoX-5b) is."
        )
    return "cogvideox"


def zimage_family(config: Any) -> str:
    """``zimage`` for Z-Image text-to-image (``ZImagePipeline``: Z-Image, Z-Image-Turbo); Z-Image Omni's transformer
    (SigLIP image features, ``siglip_feat_dim``) is refused by name."""
    if getattr(config, "siglip_feat_dim", None) is not None:
        raise ValueError(
            "Z-Image Omni (a transformer with SigLIP image conditioning, ZImageOmniPipeline) is not supported; Z-Image "
            "text-to-image (ZImagePipeline: Tongyi-MAI/Z-Image, Tongyi-MAI/Z-Image-Turbo) is."
        )
    return "zimage"


def schedule_and_prediction(scheduler: Any, family: str) -> tuple[Any, str]:
    """The teacher's ``Schedule`` and prediction type from its diffusers scheduler (flow or VP).

    A multistep scheduler in flow mode (``use_flow_sigmas`` with ``prediction_type: flow_prediction``, as the Wan 2.1
    and 2.2 Hub repositories ship ``UniPCMultistepScheduler``) is a flow schedule with ``shift = flow_shift``.
    """
    config = dict(scheduler.config)
    if "FlowMatch" in type(scheduler).__name__:
        schedule = FlowSchedule.from_diffusers(config, FLOW_TIMESTEP_SCALE[family])
        if family == "flux2":  # Flux2Pipeline passes its own μ, from the token count and the step count
            schedule = dataclasses.replace(schedule, empirical_mu=True)
        return schedule, "flow"
    if config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction":
        flow = {"num_train_timesteps": config.get("num_train_timesteps", 1000), "shift": config.get("flow_shift", 1.0)}
        return FlowSchedule.from_diffusers(flow, FLOW_TIMESTEP_SCALE[family]), "flow"
    if "beta_schedule" in config or "trained_betas" in config:
        return VPSchedule.from_diffusers(config), config.get("prediction_type", "epsilon")
    raise ValueError(
        f"Scheduler {type(scheduler).__name__} is not supported for teachers: use a VP scheduler (DDPM, DDIM, "
        "Euler, LCM, TCD) or FlowMatchEulerDiscreteScheduler."
    )


def zimage_guidance_options(teacher: Teacher, cfg: Any) -> None:
    """Give a Z-Image teacher ``ZImagePipeline``'s two guidance options from ``cfg``: ``cfg_normalization`` (a
    ``cfg_rescale``, ``zimage_cfg_normalization``) and ``cfg_truncation`` (``guidance_off``,
    ``zimage_cfg_truncation``), both acting on every guided teacher call whatever its scale; their defaults (0 and 1,
    the pipeline's) change nothing. Other families refuse them."""
    factor = float(getattr(cfg, "cfg_normalization", 0.0) or 0.0)
    truncation = float(getattr(cfg, "cfg_truncation", 1.0))
    if teacher.family != "zimage":
        if factor or truncation != 1.0:
            raise ValueError(
                "teacher.cfg_normalization and teacher.cfg_truncation are ZImagePipeline's options; the "
                f"{teacher.family} teacher has neither. Remove them from the recipe."
            )
        return
    if factor > 0:
        teacher.cfg_rescale = zimage_cfg_normalization(factor)
    if truncation < 1.0:
        teacher.guidance_off = zimage_cfg_truncation(teacher, truncation)


def zimage_cfg_normalization(factor: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``ZImagePipeline``'s ``cfg_normalization``: a guided output whose norm (over the whole sample) exceeds
    ``factor`` times the conditional one's is scaled down to it; ``(guided, cond) -> guided``, ``[b, ...]``."""

    def rescale(guided: Tensor, cond_out: Tensor) -> Tensor:
        return cap_to_norm(guided, cond_out, factor, dim=tuple(range(1, guided.ndim)))

    return rescale


def zimage_cfg_truncation(teacher: Teacher, truncation: float) -> Callable[[Tensor], Tensor]:
    """``ZImagePipeline``'s ``cfg_truncation`` as ``τ -> [b] bool``: no guidance (the conditional output alone) where
    the normalised time ``(1000 − t) / 1000`` exceeds ``truncation`` (late, low-noise steps); compared in float64 as
    the pipeline compares Python floats."""

    def off(tau: Tensor) -> Tensor:
        return (1000 - teacher.schedule.model_timestep(tau).double()) / 1000 > truncation

    return off


def expert_guidance(teacher: Teacher, high: float, low: float) -> Any:
    """``w(τ)`` for Wan 2.2's experts, ``[b]``: ``high`` where the high-noise expert denoises (``timestep ≥
    boundary``, the comparison ``WanPipeline`` and the ``wan_experts`` adapter make), ``low`` below (its
    ``guidance_scale_2``)."""
    boundary = teacher.denoiser.backbone.boundary_timestep

    def w(tau: Tensor) -> Tensor:
        return torch.where(teacher.schedule.model_timestep(tau) >= boundary, high, low).float()

    return w
