"""Loading teachers from diffusers pipelines.

``load_pipeline`` goes through ``DiffusionPipeline.from_pretrained``: a local directory loads offline; a missing
path, a missing component or an unreachable Hub id gives one ``FileNotFoundError`` naming the path, the missing
piece and the fix. ``load_teacher`` turns a pipeline into a ``Teacher``: the backbone adapter, the schedule and
prediction type from the scheduler config, and the null conditioning for classifier-free guidance.

Training from a precomputed cache (``fewstep.data.cache``) loads the teacher without its text encoders and VAE
(``load_teacher(cfg, encoders=False, null_cond=...)``): they stay on disk, the null conditioning comes from the cache,
and the VAE is loaded only while images are decoded (``vae_loaded``). ``encoder_identity`` names those encoders (class
and config hash, read from their config files) so a cache can tell whether it was made by them.

Specs accepted everywhere a pretrained model is named (``resolve_pretrained``):

* ``tiny:<family>``: the tiny offline model of that family (``fewstep.testing.tiny_path``),
* ``fewstep:<asset>``: a packaged asset such as ``digits-vp`` (``fewstep.assets.asset_path``),
* a local directory written by ``save_pretrained``, or a Hugging Face Hub id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.models.backbones import (
    WanExperts,
    is_wan_experts_pipeline,
    is_wan_image_pipeline,
    pipeline_backbone,
    qwen_true_cfg_rescale,
)
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
CONFIG_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype")  # config keys that name no architecture
__all__ = [
    "FAMILIES", "decode_latents", "detect_family", "encode_images", "encoder_components", "encoder_identity",
    "is_hub_id", "latent_normalization", "load_component", "load_pipeline", "load_teacher", "pipeline_index",
    "quiet_loading", "resolve_pretrained", "schedule_and_prediction", "to_dtype", "vae_loaded",
]  # fmt: skip


def resolve_pretrained(spec: str | os.PathLike) -> str:
    """Turn ``tiny:<family>``, ``fewstep:<asset>`` or a path / Hub id into what ``from_pretrained`` takes."""
    spec = str(spec)
    if spec.startswith("tiny:"):
        from fewstep.testing import tiny_path

        return str(tiny_path(spec.removeprefix("tiny:")))
    if spec.startswith("fewstep:"):
        from fewstep.assets import asset_path

        return str(asset_path(spec.removeprefix("fewstep:")))
    return os.path.expanduser(spec)


def is_hub_id(spec: str | os.PathLike) -> bool:
    """Whether a resolved spec (``resolve_pretrained``) names a Hugging Face Hub repository, not a local directory."""
    spec = str(spec)
    return not (Path(spec).exists() or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")))


# transformers' notice, once per class, that an image processor falls back to its PIL version without torchvision:
# diffusers' pipeline modules import CLIPImageProcessor (and the IP-adapter loader SiglipImageProcessor), which
# fewstep never uses.
IMAGE_PROCESSOR_NOTICE = "requires torchvision (not installed); falling back to"
_NOTICE_LOGGER = "transformers.utils.import_utils"


class _DropImageProcessorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return IMAGE_PROCESSOR_NOTICE not in record.getMessage()


# A pixel video teacher (``wan_class``) is saved as ``DDPMPipeline(unet=WanTransformer3DModel)``: the only stock
# pipeline made of a bare backbone and a scheduler. Its type notice for ``unet`` says nothing the user can act on.
_PIPELINE_LOGGER = "diffusers.pipelines.pipeline_utils"
PIXEL_VIDEO_NOTICE = "Expected types for unet: (<class 'diffusers.models.unets.unet_2d.UNet2DModel'>,), got <class "
PIXEL_VIDEO_BACKBONE = "WanTransformer3DModel"


class _DropPixelVideoNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(PIXEL_VIDEO_NOTICE) and PIXEL_VIDEO_BACKBONE in message)


# diffusers' notice, each time a guider is built (HunyuanVideo 1.5's pipeline loads one), that guiders are
# experimental: fewstep reads the guider's config once (hunyuan15_guider_problem) and pins what it reproduces.
_GUIDER_LOGGER = "diffusers.guiders.guider_utils"
GUIDER_NOTICE = "Guiders are currently an experimental feature"


class _DropGuiderNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(GUIDER_NOTICE)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Around a pipeline load (``load_pipeline``): drop transformers' image-processor notice and diffusers' guider
    notice above, and when stderr is not a terminal turn diffusers' and transformers' loading bars off (transformers'
    bar nested inside diffusers' writes cursor-up escapes, ``ESC[A``, into log files). Everything is restored on exit:
    the notices still show for other code, and the bars on a terminal or outside the load."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    notice_logger, drop = logging.getLogger(_NOTICE_LOGGER), _DropImageProcessorNotice()
    notice_logger.addFilter(drop)
    pipeline_logger, drop_pixel_video = logging.getLogger(_PIPELINE_LOGGER), _DropPixelVideoNotice()
    pipeline_logger.addFilter(drop_pixel_video)
    guider_logger, drop_guider = logging.getLogger(_GUIDER_LOGGER), _DropGuiderNotice()
    guider_logger.addFilter(drop_guider)
    restore = []
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        for lib in (diffusers_logging, transformers_logging):
            if lib.is_progress_bar_enabled():
                lib.disable_progress_bar()
                restore.append(lib.enable_progress_bar)
    try:
        yield
    finally:
        notice_logger.removeFilter(drop)
        pipeline_logger.removeFilter(drop_pixel_video)
        guider_logger.removeFilter(drop_guider)
        for enable in restore:
            enable()


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a ``torch.dtype``) to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _dtype_key() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` in ``from_pretrained`` (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _check_local_pipeline(path: Path, skip: Sequence[str] = ()) -> None:
    """Fail early, naming the missing piece, before diffusers gives a less specific error (components in ``skip`` are
    not loaded, so they need not be there)."""
    if not path.exists():
        raise FileNotFoundError(
            f"Pipeline directory {str(path)!r} does not exist. Pass a diffusers pipeline directory (one written by "
            "`pipe.save_pretrained(dir)`, with a model_index.json), a Hugging Face Hub id, or `tiny:<family>`."
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no model_index.json, so it is not a diffusers pipeline directory. Save the whole "
            "pipeline with `pipe.save_pretrained(dir)` (a single model folder such as a UNet is not enough)."
        )
    components = json.loads(index.read_text())
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None or name in skip:
            continue
        if not (path / name).is_dir():
            raise FileNotFoundError(
                f"Pipeline {str(path)!r} lists the component {name!r} ({value[1]}) but {str(path / name)!r} is "
                f"missing. Copy that folder from the original pipeline or re-save it with `pipe.save_pretrained`."
            )


def load_pipeline(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    skip: Sequence[str] = (),
) -> Any:
    """Load a diffusers pipeline from a local directory (offline) or a Hub id.

    Args:
        path_or_id: a spec understood by ``resolve_pretrained`` (``tiny:sdxl``, a directory, a Hub id).
        dtype: the dtype of every component (``torch_dtype``).
        revision: the Hub revision (branch, tag or commit).
        variant: the weight variant, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
        skip: components left on disk (``from_pretrained(..., name=None)``), e.g. ``encoder_components``. A skipped
            ``vae`` keeps the pipeline's ``vae_scale_factor`` (read from the VAE's config).

    Raises:
        FileNotFoundError: the directory, one of its components, or the Hub id cannot be found.
    """
    with quiet_loading():  # the tiny zoo builds (and saves) its pipelines inside resolve_pretrained
        return _load_pipeline(path_or_id, dtype, revision, variant, tuple(skip))


def _load_pipeline(path_or_id: str | os.PathLike, dtype: str | torch.dtype, revision: str | None,
                   variant: str | None, skip: tuple[str, ...]) -> Any:  # fmt: skip
    from diffusers import DiffusionPipeline

    spec = resolve_pretrained(path_or_id)
    path = Path(spec)
    is_local = not is_hub_id(spec)
    kwargs: dict[str, Any] = {_dtype_key(): to_dtype(dtype), "revision": revision, "variant": variant}
    kwargs.update({name: None for name in skip})
    if is_local:
        _check_local_pipeline(path, skip)
        try:
            pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True, **kwargs)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"Could not load the pipeline in {spec!r}: {err}. Check that every component folder holds its "
                f"config and weights (variant={variant!r}); re-save it with `pipe.save_pretrained(dir)`."
            ) from err
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(spec, **kwargs)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            reason = "HF_HUB_OFFLINE=1 disables downloads" if offline else str(err).splitlines()[0][:300]
            raise FileNotFoundError(
                f"Could not load {spec!r}: it is not a local directory and not in the local Hugging Face cache "
                f"({reason}). Fix: download it where the Hub is reachable (`huggingface-cli download {spec}`) and "
                "pass the local directory, or point HF_HOME at a cache that holds it."
            ) from err
    if "vae" in skip and hasattr(pipe, "vae_scale_factor"):  # without a VAE the pipelines assume 8
        vae_config = _component_config(spec, "vae", pipeline_index(spec, revision)["vae"][0], revision)
        levels = vae_config.get("block_out_channels") or vae_config["encoder_block_out_channels"]  # DC-AE: Sana
        pipe.vae_scale_factor = 2 ** (len(levels) - 1)  # as the pipelines compute it
    if "vae" in skip and hasattr(pipe, "vae_scale_factor_spatial"):  # Wan: without a VAE its pipelines assume 4 and 8
        vae_config = _component_config(spec, "vae", pipeline_index(spec, revision)["vae"][0], revision)
        pipe.vae_scale_factor_temporal = int(vae_config.get("scale_factor_temporal") or 4)
        pipe.vae_scale_factor_spatial = int(vae_config.get("scale_factor_spatial") or 8)  # Wan 2.2's VAE: 16
    from fewstep.testing import apply_resolution_marker

    apply_resolution_marker(pipe, spec)  # tiny zoo directories record their default resolution
    if is_local:
        apply_video_record(pipe, path)
    return pipe


VIDEO_RECORD = "fewstep_video.json"  # a pixel video teacher's training record, with the clip size it generates


def apply_video_record(pipe: Any, path: Path) -> None:
    """Give a pixel video teacher (``wan_class``, e.g. ``fewstep:moving-digits-flow``) the clip size it was trained
    on, ``default_video_size = (frames, height, width)`` from its directory's ``VIDEO_RECORD``. Other directories are
    left alone."""
    record = path / VIDEO_RECORD
    if record.is_file():
        frames, height, width = json.loads(record.read_text())["video_size"]
        pipe.default_video_size = (int(frames), int(height), int(width))


def pipeline_index(path_or_id: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """A pipeline's ``model_index.json`` (its components and their classes), without loading anything."""
    from diffusers import DiffusionPipeline

    spec = resolve_pretrained(path_or_id)
    local = not is_hub_id(spec)
    if local and not (Path(spec) / "model_index.json").is_file():
        _check_local_pipeline(Path(spec))  # raises, naming what is missing
    try:
        return dict(DiffusionPipeline.load_config(spec, revision=revision, local_files_only=local))
    except OSError as err:
        raise FileNotFoundError(
            f"Could not read the model_index.json of {spec!r} ({str(err).splitlines()[0][:300]}). Download the "
            f"pipeline where the Hub is reachable (`huggingface-cli download {spec}`) or pass a local directory."
        ) from err


def encoder_components(index: Mapping[str, Any]) -> list[str]:
    """The text encoders and the VAE a ``model_index.json`` lists: what training from a cache leaves on disk."""
    return [
        name
        for name, value in index.items()
        if isinstance(value, list | tuple) and len(value) == 2 and value[0] is not None
        and (name.startswith("text_encoder") or name == "vae")
    ]  # fmt: skip


# Pipelines that cannot be built without their VAE: HunyuanVideo 1.5's read vae.config in their __init__ (diffusers
# 0.42), so a teacher trained from a cache keeps it loaded.
VAE_REQUIRED_PIPELINES = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")


def cache_skipped_components(index: Mapping[str, Any]) -> tuple[str, ...]:
    """The components a teacher trained from a cache leaves on disk (``encoder_components``), less the VAE of a
    pipeline that cannot be built without one (``VAE_REQUIRED_PIPELINES``)."""
    keep_vae = index.get("_class_name") in VAE_REQUIRED_PIPELINES
    return tuple(name for name in encoder_components(index) if not (keep_vae and name == "vae"))


def _component_config(spec: str, name: str, library: str, revision: str | None) -> dict[str, Any]:
    """The ``config.json`` of one component as a dict, read with its library's own loader (no weights)."""
    local = not is_hub_id(spec)
    if library == "transformers":
        from transformers import PretrainedConfig

        config, _ = PretrainedConfig.get_config_dict(spec, subfolder=name, revision=revision, local_files_only=local)
        return dict(config)
    from diffusers import ConfigMixin

    class _AnyConfig(ConfigMixin):  # ConfigMixin reads the file its class names; any diffusers config.json
        config_name = "config.json"

    return dict(_AnyConfig.load_config(spec, subfolder=name, revision=revision, local_files_only=local))


def encoder_identity(path_or_id: str | os.PathLike, revision: str | None = None) -> dict[str, dict[str, str]]:
    """``{component: {"class", "config_sha256"}}`` for each text encoder and the VAE of a pipeline, from its
    ``model_index.json`` and their ``config.json`` files (nothing is loaded). The hash covers every architecture key of
    the config (not versions or the saved dtype), so two pipelines with these encoders agree and any other differs."""
    spec = resolve_pretrained(path_or_id)
    index = pipeline_index(spec, revision)
    identity = {}
    for name in encoder_components(index):
        library, class_name = index[name]
        config = _component_config(spec, name, library, revision)
        kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in CONFIG_VOLATILE_KEYS}
        digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
        identity[name] = {"class": str(class_name), "config_sha256": digest}
    return identity


def load_component(
    path_or_id: str | os.PathLike,
    name: str,
    dtype: str | torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
) -> torch.nn.Module:
    """One model component of a pipeline (e.g. its ``vae``), frozen, with its library's ``from_pretrained``."""
    spec = resolve_pretrained(path_or_id)
    library, class_name = pipeline_index(spec, revision)[name]
    cls = getattr(importlib.import_module(str(library)), str(class_name))
    with quiet_loading():
        module = cls.from_pretrained(
            spec, subfolder=name, revision=revision, variant=variant, local_files_only=not is_hub_id(spec),
            **{_dtype_key(): to_dtype(dtype)},
        )  # fmt: skip
    return module.eval().requires_grad_(False)


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


def load_teacher(cfg: Any, encoders: bool = True, null_cond: Conditioning | None = None) -> Teacher:
    """Build a ``Teacher`` from a ``TeacherConfig`` (or any object with its attributes).

    ``cfg`` fields: ``pretrained``, ``family`` (``auto`` or one of ``FAMILIES``), ``dtype``, ``guidance_scale``
    (Imagen convention, 1 = off), ``revision``, ``variant``; Wan 2.2 also ``guidance_scale_2``, the low-noise
    expert's guidance (``WanPipeline``'s; default: ``guidance_scale``); Z-Image also ``cfg_normalization`` and
    ``cfg_truncation`` (``zimage_guidance_options``). Z-Image's pipeline guides as ``pos + g·(pos − neg)``: its
    ``guidance_scale`` ``g`` is ``w − 1`` here.

    Guidance-distilled Flux and FLUX.2 (``guidance_embeds``) take their guidance as an input: there ``guidance_scale``
    is the embedded guidance value (FLUX.1-dev uses 3.5, FLUX.2 [dev] 4.0), stored in ``null_cond.guidance`` and used by
    ``encode_prompts``; the teacher's CFG scale is 1 (no second forward).

    Args:
        encoders: ``False`` leaves the text encoders and the VAE on disk (training from a cache): the teacher cannot
            encode prompts or images, and decodes latents by loading its VAE for the moment (``vae_loaded``).
        null_cond: the null conditioning when ``encoders`` is ``False`` (the cache's; without encoders the empty
            prompt cannot be encoded). Flux's embedded guidance is set from ``cfg`` as usual.
    """
    from fewstep.models.prompts import null_conditioning

    dtype = getattr(cfg, "dtype", "float32")
    revision, variant = getattr(cfg, "revision", None), getattr(cfg, "variant", None)
    skip = () if encoders else cache_skipped_components(pipeline_index(cfg.pretrained, revision))
    pipe = load_pipeline(cfg.pretrained, dtype, revision, variant, skip=skip)
    pipe.set_progress_bar_config(disable=True)
    family = detect_family(pipe)
    wanted = getattr(cfg, "family", "auto") or "auto"
    if wanted not in ("auto", family):
        raise ValueError(
            f"teacher.family is {wanted!r} but {cfg.pretrained!r} is a {family} pipeline "
            f"({type(pipeline_backbone(pipe)).__name__}). Set teacher.family to 'auto' or {family!r}."
        )
    for module in pipe.components.values():  # encoders and VAE are frozen too
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    backbone = WanExperts.from_pipeline(pipe) if family == "wan22" else pipeline_backbone(pipe)
    schedule, prediction_type = schedule_and_prediction(pipe.scheduler, family)
    denoiser = Denoiser(backbone, schedule, prediction_type, ADAPTER_BY_FAMILY[family])
    guidance_scale = float(getattr(cfg, "guidance_scale", 1.0))
    embedded = None
    if family in ("flux", "flux2") and getattr(backbone.config, "guidance_embeds", False):
        embedded, guidance_scale = guidance_scale, 1.0
    if family in ("unet2d", "wan_class"):
        null_cond = _null_class(backbone)
    elif encoders:
        null_cond = null_conditioning(pipe, family, guidance=embedded)
    elif null_cond is None:
        raise ValueError(
            f"load_teacher(..., encoders=False) needs null_cond: without its text encoders the {family} teacher "
            "cannot encode the empty prompt. Pass the null conditioning of the cache (fewstep.data.cache)."
        )
    elif embedded is not None:
        null_cond = null_cond.replace(guidance=torch.full((1,), float(embedded), dtype=torch.float32))
    teacher = Teacher(denoiser, guidance_scale, pipe, null_cond, family)
    if family == "qwen_image":  # its pipeline rescales the guided velocity to the conditional one's norm
        teacher.cfg_rescale = qwen_true_cfg_rescale
    zimage_guidance_options(teacher, cfg)
    if family == "wan22" and getattr(cfg, "guidance_scale_2", None) is not None:
        teacher.guidance_by_level = expert_guidance(teacher, guidance_scale, float(cfg.guidance_scale_2))
    if "vae" in skip:
        teacher.vae_loader = functools.partial(load_component, cfg.pretrained, "vae", dtype, revision, variant)
    return teacher


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


def _null_class(backbone: Any) -> Conditioning | None:
    """Class-conditional ``UNet2DModel``: the null class is the last embedding (``num_class_embeds - 1``); a
    class-conditional Wan transformer (``wan_class``): the last entry of its one-hot token (``text_dim - 1``)."""
    config = backbone.config
    n = getattr(config, "num_class_embeds", None) or getattr(config, "text_dim", None)
    if not n:
        return None
    return Conditioning(class_labels=torch.tensor([n - 1], dtype=torch.long))


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
