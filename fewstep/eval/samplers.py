"""What an evaluation samples: harness ``Sampler``s of a teacher (``teacher_sampler``: deterministic multi-step
sampling with CFG) and of a trained student (``student_sampler``: its objective's own sampler), and what they are
conditioned on and sampled from (``conditioning_kind``, ``teacher_conditioning``, ``noise_shape``,
``run_noise_shape``, ``default_guidance``).

``fewstep eval``'s targets (``fewstep.eval.targets``), periodic evaluation in training (``fewstep.eval.periodic``),
the quickstart (``fewstep.eval.quickstart``) and the benchmark scripts build their rows from these samplers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.eval.harness import EvalInputs, Sampler
from fewstep.models.backbones import latent_shape, num_tokens, pipeline_backbone, video_compression
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher

CLASS_GUIDANCE = 2.0  # default w of class-conditional teachers with a null class (the digits quickstart's)


# ---------------------------------------------------------------------------------------------------------------------
# What a model is conditioned on
# ---------------------------------------------------------------------------------------------------------------------


def backbone_of(pipeline: Any) -> nn.Module:
    """The pipeline's denoising network (``unet`` or ``transformer``)."""
    return pipeline_backbone(pipeline)


def conditioning_kind(pipeline: Any) -> tuple[str, int | None, int | None]:
    """``(kind, num_classes, null_class)`` of a pipeline: ``class`` (``num_class_embeds`` K+1, the last one the null
    class of CFG), ``text`` (a text encoder) or ``none``."""
    if getattr(pipeline, "text_encoder", None) is not None or getattr(pipeline, "tokenizer", None) is not None:
        return "text", None, None
    from fewstep.models.families import detect_family

    config = backbone_of(pipeline).config
    n = getattr(config, "num_class_embeds", None)
    if not n and detect_family(pipeline) == "wan_class":  # one-hot class tokens, the last entry the null class
        n = config.text_dim
    if n:
        return "class", int(n) - 1, int(n) - 1
    return "none", None, None


def teacher_conditioning(teacher: Teacher) -> tuple[str, int | None]:
    """``(kind, num_classes)`` of a teacher, custom teachers included (their null class, if any, is the last)."""
    if teacher.pipeline is not None:
        return conditioning_kind(teacher.pipeline)[:2]
    null = teacher.null_cond.class_labels if teacher.null_cond is not None else None
    if null is not None:
        return "class", int(null.reshape(-1)[0])
    return "none", None


def noise_shape(pipeline: Any, resolution: int | None = None) -> tuple[int, ...]:
    """One image's initial noise: the (unpacked) latent ``[c, h, w]`` of ``pipeline`` at ``resolution``."""
    from fewstep.models.families import detect_family

    view = SimpleNamespace(pipeline=pipeline, family=detect_family(pipeline))
    return tuple(latent_shape(view, 1, resolution)[1:])  # type: ignore[arg-type]


def default_guidance(teacher: Teacher) -> float:
    """The teacher's usual CFG ``w`` (Imagen convention): its pipeline's ``guidance_scale`` default, ``CLASS_GUIDANCE``
    for class-conditional teachers with a null class, 1 (off) when it has no null conditioning or embeds guidance."""
    if teacher.null_cond is None or teacher.pipeline is None:
        return 1.0
    if getattr(backbone_of(teacher.pipeline).config, "guidance_embeds", False):
        return 1.0  # Flux-dev style: guidance is an input, not CFG
    param = inspect.signature(teacher.pipeline.__call__).parameters.get("guidance_scale")
    if param is not None and isinstance(param.default, int | float):
        return float(param.default)
    return CLASS_GUIDANCE if teacher.null_cond.class_labels is not None else 1.0


FirstFrames = Any  # one first frame for every prompt (a PIL image, an image file, [3, H, W] in [-1, 1]) or a dict
#                    prompt → first frame


def clip_size_of(pipeline: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the clip a video latent ``[..., f, h, w]`` decodes to: ``(f − 1)·t + 1`` frames
    and ``s`` pixels per latent (``video_compression``: Wan ``t = 4``, ``s = 8``; Wan 2.2's VAE ``s = 16``)."""
    temporal, spatial = video_compression(pipeline)
    f, h, w = (int(d) for d in shape[-3:])
    return (f - 1) * temporal + 1, h * spatial, w * spatial


def first_frames_of(prompts: list[str], images: FirstFrames) -> list[Any]:
    """One first frame per prompt (PIL images or ``[3, H, W]`` tensors) from ``images`` (``FirstFrames``)."""
    from PIL import Image

    def one(image: Any) -> Any:
        if isinstance(image, str | Path):
            with Image.open(image) as opened:
                return opened.convert("RGB")
        return image[0] if isinstance(image, Tensor) and image.ndim == 4 else image

    if isinstance(images, dict):
        missing = [p for p in dict.fromkeys(prompts) if p not in images]
        if missing:
            raise ValueError(f"No first frame for the prompt(s) {missing[:3]}: images= maps every prompt to its image.")
        return [one(images[p]) for p in prompts]
    return [one(images)] * len(prompts)


def first_frames_sha256(images: FirstFrames) -> str | None:
    """A digest of the first frames' pixels (``None``: no first frames), prompt by prompt for a dict: it tells
    evaluations with other first frames apart (the report, the teacher reference's cache key)."""
    if images is None:
        return None
    digest = hashlib.sha256()
    items = sorted(images.items()) if isinstance(images, dict) else [("", images)]
    for prompt, image in items:
        (pixels,) = first_frames_of([prompt], image)
        array = pixels.detach().cpu().numpy() if isinstance(pixels, Tensor) else np.asarray(pixels)
        digest.update(prompt.encode() + str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def _conditions(
    teacher: Teacher, inputs: EvalInputs, device: torch.device, images: FirstFrames = None, shape: Sequence[int] = ()
) -> tuple[Conditioning, Conditioning | None]:
    """``(cond, uncond)`` of ``inputs``; an image-to-video teacher's prompts get their first frames (``images``),
    prepared for the clip that latents of ``shape`` decode to."""
    from fewstep.models.prompts import FIRST_FRAME_REQUIRED, IMAGE_TO_VIDEO_FAMILIES

    i2v = teacher.family in IMAGE_TO_VIDEO_FAMILIES
    if images is not None and not (i2v and inputs.prompts is not None):
        families = ", ".join(IMAGE_TO_VIDEO_FAMILIES)
        raise ValueError(f"images= (first frames) is for the prompts of image-to-video models ({families}); this "
                         f"{teacher.family} evaluation takes none.")  # fmt: skip
    if inputs.labels is not None:
        cond = Conditioning(class_labels=inputs.labels.to(device))
        return cond, teacher.uncond_like(cond)
    if inputs.prompts is not None:
        from fewstep.models.prompts import encode_prompts

        prompts = list(inputs.prompts)
        if images is None and teacher.family in FIRST_FRAME_REQUIRED:
            raise ValueError(
                f"The {teacher.family} model generates each clip from its first frame: pass images= to teacher_sampler"
                " / student_sampler (one image for every prompt, or a {prompt: image} dict; PIL images, image files or"
                " [3, H, W] tensors in [-1, 1]); `fewstep eval` takes them with --images."
            )
        if images is None:
            return encode_prompts(teacher, prompts)
        frames, height, width = clip_size_of(teacher.pipeline, shape)
        pixels = first_frames_of(prompts, images)
        if all(isinstance(p, Tensor) for p in pixels):
            pixels = torch.stack(pixels)  # [b, 3, H, W]
        return encode_prompts(teacher, prompts, images=pixels, resolution=(height, width), num_frames=frames)
    return Conditioning(), None


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------------------------------
# Samplers from fewstep objects (teacher, trained student)
# ---------------------------------------------------------------------------------------------------------------------


def teacher_grid(teacher: Teacher, num_steps: int, num_tokens: int | None = None) -> tuple[Tensor, str]:
    """The teacher's ``num_steps + 1`` levels and the solver's name: its pipeline scheduler's own grid when fewstep
    reproduces that scheduler (DDIM, Euler, FlowMatchEuler; on the sigmas the pipeline passes it, ``pipeline_sigmas``),
    else DDIM on the ``trailing`` grid (VP) or Euler on the
    shifted uniform grid (flow)."""
    from fewstep.models.backbones import pipeline_sigmas
    from fewstep.solvers.grids import SUPPORTED, scheduler_taus, teacher_taus

    scheduler = getattr(teacher.pipeline, "scheduler", None)
    name = type(scheduler).__name__
    if scheduler is not None and name in SUPPORTED:
        try:
            solver = "DDIM (η=0)" if teacher.schedule.kind == "vp" else "Euler"
            sigmas = pipeline_sigmas(teacher.pipeline, num_steps)  # HunyuanVideo 1.5 passes its own
            taus = scheduler_taus(scheduler, teacher.schedule, num_steps, num_tokens, sigmas=sigmas)
            return taus, f"{solver} on {name}'s timesteps"
        except ValueError:
            pass
    solver = "DDIM (η=0), trailing grid" if teacher.schedule.kind == "vp" else "Euler, uniform shifted grid"
    return teacher_taus(teacher.schedule, num_steps, num_tokens), solver


def _levels(schedule: Any, levels: Tensor, evaluated: Tensor) -> dict[str, Any]:
    """The τ ``levels`` a sampler passes through and, for VP, the integer timesteps the network is ``evaluated`` at."""
    out: dict[str, Any] = {"levels": [round(float(t), 6) for t in levels]}
    if schedule.kind == "vp":
        out["timesteps"] = schedule.model_timestep(evaluated).long().tolist()
    return out


def _schedule_of(teacher: Teacher, taus: Tensor) -> dict[str, Any]:
    return _levels(teacher.schedule, taus, taus[:-1])  # the last level is where sampling ends


def teacher_sampler(
    teacher: Teacher,
    steps: Sequence[int],
    guidance_scale: float | None = None,
    *,
    name: str | None = None,
    source: str = "",
    guidance_source: str = "",
    resolution: int | None = None,
    shape: Sequence[int] | None = None,
    grid: Callable[[int], tuple[Tensor, str]] | None = None,
    images: FirstFrames = None,
) -> Sampler:
    """The teacher as a harness ``Sampler``: deterministic multi-step sampling (``teacher_grid``) with CFG ``w``.

    Args:
        teacher: a loaded teacher (its backbone's device is where it samples).
        steps: step counts.
        guidance_scale: ``w`` (Imagen convention, 1 = off); default ``default_guidance(teacher)``.
        name: the row label (default ``"teacher (<solver>, w=<w>)"``).
        source: where the teacher came from (for the report).
        guidance_source: why this ``w`` (for the report).
        resolution: image size for text teachers (default: the pipeline's).
        shape: one image's noise shape (default: the pipeline's latent; required for custom teachers).
        grid: ``num_steps -> (num_steps + 1 levels, solver description)``; default ``teacher_grid``.
        images: first frames of an image-to-video teacher (required for Wan 2.1 I2V): one image for every prompt, or a
            ``{prompt: image}`` dict (PIL images, image files or ``[3, H, W]`` tensors in [-1, 1]).
    """
    w = default_guidance(teacher) if guidance_scale is None else float(guidance_scale)
    if shape is None and teacher.pipeline is None:
        raise ValueError("A custom teacher (no pipeline) needs `shape=`: one image's noise shape, e.g. (1, 8, 8).")
    shape = tuple(shape) if shape is not None else noise_shape(teacher.pipeline, resolution)
    tokens = num_tokens(teacher.denoiser, (1, *shape))
    levels = grid if grid is not None else (lambda n: teacher_grid(teacher, n, tokens))
    solver = levels(1)[1]
    device = _device_of(teacher.denoiser)

    def fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        from fewstep.models.vae import decode_latents

        cond, uncond = _conditions(teacher, inputs, device, images, noise.shape)
        taus = levels(num_steps)[0].to(device)
        x0 = teacher.sample(noise.to(device), cond, taus, uncond, guidance_scale=w)
        return decode_latents(teacher, x0)

    info = {
        "kind": "teacher", "source": source, "weights": "pretrained", "family": teacher.family,
        "guidance_scale": w, "guidance_source": guidance_source or "default for this teacher",
        "scheduler": solver, "prediction_type": teacher.denoiser.prediction_type,
        "schedule": teacher.schedule.kind,
        **({"first_frames_sha256": first_frames_sha256(images)} if images is not None else {}),
    }  # fmt: skip
    return Sampler(
        name=name or f"teacher ({'DDIM' if teacher.schedule.kind == 'vp' else 'Euler'}, w={w:g})",
        fn=fn, noise_shape=shape, steps=list(steps), network=teacher.denoiser.backbone, info=info,
        schedule=lambda n: {"solver": solver, **_schedule_of(teacher, levels(n)[0])},
    )  # fmt: skip


def student_sampler(
    components: Any,
    steps: Sequence[int],
    *,
    name: str | None = None,
    weights: str = "raw",
    source: str = "",
    resolution: int | None = None,
    shape: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    images: FirstFrames = None,
) -> Sampler:
    """A trained student (``Components`` of a run) as a harness ``Sampler``, sampled by its objective's sampler.

    Args:
        components: ``fewstep.train.build.Components`` (teacher, student, objective) with the weights to evaluate.
        steps: student step counts.
        name: the row label (default ``"student (<objective>, <weights>)"``).
        weights: which weights these are (``ema`` or ``raw``), for the label and the report.
        source: the run / checkpoint, for the report.
        resolution: image size for text teachers.
        shape: one image's noise shape (default: the teacher pipeline's latent; needed for custom teachers).
        guidance_scale: ``w`` (Imagen convention) instead of the one the objective's sampler recommends; only for
            samplers that take one (``ValueError`` otherwise, e.g. DMD students, which sample without CFG).
        images: first frames of an image-to-video student (required for Wan 2.1 I2V), as ``teacher_sampler`` takes
            them.
    """
    teacher, objective = components.teacher, components.objective
    sampler = objective.sampler()
    objective_name = getattr(getattr(objective, "config", None), "name", type(objective).__name__.lower())
    guidance_source = "the objective's sampler (recommended for this student)"
    if guidance_scale is not None:
        if not (dataclasses.is_dataclass(sampler) and hasattr(sampler, "guidance_scale")):
            raise ValueError(
                f"The {objective_name} student's sampler ({type(sampler).__name__}) takes no guidance scale: it "
                "samples with the guidance it was distilled with. Leave the guidance unset for this student."
            )
        sampler = dataclasses.replace(sampler, guidance_scale=float(guidance_scale))
        guidance_source = "given"
    denoiser = getattr(sampler, "denoiser", components.student.denoiser)
    device = _device_of(denoiser)

    def fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        from fewstep.models.vae import decode_latents

        cond, _ = _conditions(teacher, inputs, device, images, noise.shape)
        return decode_latents(teacher, sampler(noise.to(device), cond, num_steps, generator))

    image_shape = tuple(shape) if shape is not None else noise_shape(teacher.pipeline, resolution)

    def schedule(num_steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {"solver": type(sampler).__name__}
        if hasattr(sampler, "timesteps"):
            # the levels the student is evaluated at (LCM: num_steps of them); samplers whose levels depend on the
            # image size (dynamic shift, e.g. Flux) take the batch shape
            takes_shape = "shape" in inspect.signature(sampler.timesteps).parameters
            levels = sampler.timesteps(num_steps, (1, *image_shape)) if takes_shape else sampler.timesteps(num_steps)
            out.update(_levels(teacher.schedule, levels, levels))
        return out

    info = {
        "kind": "student", "source": source, "weights": weights, "objective": objective_name,
        "student": "lora" if components.student.is_lora else "full",
        "guidance_scale": float(getattr(sampler, "guidance_scale", 1.0)),
        "guidance_source": guidance_source,
        "scheduler": f"fewstep {type(sampler).__name__}", "family": teacher.family,
        **({"first_frames_sha256": first_frames_sha256(images)} if images is not None else {}),
    }  # fmt: skip
    return Sampler(
        name=name or f"student ({objective_name}, {weights})", fn=fn, steps=list(steps), info=info,
        noise_shape=image_shape,
        network=denoiser.backbone, schedule=schedule, context=components.student.sampling,
    )  # fmt: skip


def run_noise_shape(recipe: Any, teacher: Teacher) -> tuple[int, ...]:
    """One image's noise shape in a run: the teacher pipeline's latent at ``data.resolution``, or (custom teachers)
    the shape of the run's data."""
    if teacher.pipeline is not None:
        return noise_shape(teacher.pipeline, recipe.data.resolution)
    from fewstep.data.loader import build_batches

    return tuple(build_batches(recipe.data, teacher).preview(1).x0.shape[1:])


def num_parameters(module: nn.Module) -> int:
    """Distinct parameters (a LoRA student counts its frozen base and its adapters)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
