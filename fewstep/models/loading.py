"""Loading teachers from diffusers pipelines.

``load_pipeline`` goes through ``DiffusionPipeline.from_pretrained``: a local directory loads offline; a missing
path, a missing component or an unreachable Hub id gives one ``FileNotFoundError`` naming the path, the missing
piece and the fix. ``load_teacher`` turns a pipeline into a ``Teacher``: the backbone adapter, the schedule and
prediction type from the scheduler config (the family rules of ``fewstep.models.families``), and the null conditioning
for classifier-free guidance. Decoding and encoding through the teacher's VAE: ``fewstep.models.vae``.

Training from a precomputed cache (``fewstep.data.cache``) loads the teacher without its text encoders and VAE
(``load_teacher(cfg, encoders=False, null_cond=...)``): they stay on disk, the null conditioning comes from the cache,
and the VAE is loaded only while images are decoded (``fewstep.models.vae.vae_loaded``). ``encoder_identity`` names
those encoders (class and config hash, read from their config files) so a cache can tell whether it was made by them.

Specs accepted everywhere a pretrained model is named (``resolve_pretrained``):

* ``tiny:<family>``: the tiny offline model of that family (``fewstep.testing.tiny_path``),
* ``fewstep:<asset>``: a packaged asset such as ``digits-vp`` (``fewstep.assets.asset_path``),
* a local directory written by ``save_pretrained``, or a Hugging Face Hub id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fewstep.models.backbones import (
    WanExperts,
    pipeline_backbone,
    qwen_true_cfg_rescale,
)
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.families import (
    ADAPTER_BY_FAMILY,
    detect_family,
    expert_guidance,
    schedule_and_prediction,
    zimage_guidance_options,
)
from fewstep.models.teacher import Teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
CONFIG_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype")  # config keys that name no architecture
__all__ = [
    "encoder_components", "encoder_identity", "is_hub_id", "load_component", "load_pipeline", "load_teacher",
    "pipeline_index", "quiet_loading", "resolve_pretrained", "to_dtype",
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


def _null_class(backbone: Any) -> Conditioning | None:
    """Class-conditional ``UNet2DModel``: the null class is the last embedding (``num_class_embeds - 1``); a
    class-conditional Wan transformer (``wan_class``): the last entry of its one-hot token (``text_dim - 1``)."""
    config = backbone.config
    n = getattr(config, "num_class_embeds", None) or getattr(config, "text_dim", None)
    if not n:
        return None
    return Conditioning(class_labels=torch.tensor([n - 1], dtype=torch.long))
