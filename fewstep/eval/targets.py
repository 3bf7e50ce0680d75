"""What ``fewstep eval TARGET`` evaluates: harness ``Sampler``s with their provenance, from

* a training run directory (``run_target``): the student of a checkpoint (EMA weights when the run kept them) and,
  for reference, the run's teacher at its usual steps with CFG;
* an exported student directory (``export_target``): a LoRA on its base pipeline or a merged pipeline, sampled by
  stock diffusers with the exported scheduler and ``read_schedule(dir).call_kwargs(n)`` (class-conditional
  ``UNet2DModel`` exports, which ``DDPMPipeline`` cannot condition, run the stock scheduler and model in the
  pipeline's own loop with ``class_labels``);
* a teacher (``teacher_target``): a hub id, a local pipeline, ``tiny:<family>`` or ``fewstep:<asset>``.

``load_target(spec, ...)`` picks the kind. Building blocks shared with periodic evaluation in training:
``teacher_sampler`` and ``student_sampler`` (from ``fewstep.train.build.Components``), ``conditioning_kind``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.eval.harness import EvalInputs, Sampler, balanced_labels, cycled_prompts
from fewstep.eval.suite import benchmark_of
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher

CLASS_GUIDANCE = 2.0  # default w of class-conditional teachers with a null class (the digits quickstart's)
DEFAULT_PROMPTS = ("a photo of a cat", "a red apple on a table", "a mountain lake at sunrise", "a city street at night")


@dataclass
class Target:
    """Samplers to evaluate and what they are conditioned on.

    Attributes:
        kind: ``run``, ``export`` or ``teacher``.
        source: the path or spec it came from.
        samplers: the models, in table order (the student first, then the reference teacher).
        conditioning: ``class``, ``text`` or ``none``.
        num_classes: classes of a class-conditional model (labels ``0..K-1``).
        dataset: the benchmark data set of the images (``digits``, ``fashion_mnist``) or ``None``
            (``fewstep.eval.suite.benchmark_of``); picks the default metrics.
        info: provenance for the report header.
    """

    kind: str
    source: str
    samplers: list[Sampler]
    conditioning: str
    num_classes: int | None = None
    dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def inputs(self, num_samples: int, prompts: Sequence[str] | None = None) -> EvalInputs:
        """Balanced labels (class-conditional), cycled ``prompts`` (text; default ``DEFAULT_PROMPTS``) or none."""
        if self.conditioning == "class":
            return balanced_labels(num_samples, int(self.num_classes or 1))
        if self.conditioning == "text":
            return cycled_prompts(prompts or DEFAULT_PROMPTS, num_samples)
        return EvalInputs(num_samples=num_samples)


# ---------------------------------------------------------------------------------------------------------------------
# What a model is conditioned on
# ---------------------------------------------------------------------------------------------------------------------


def backbone_of(pipeline: Any) -> nn.Module:
    """The pipeline's denoising network (``unet`` or ``transformer``)."""
    from fewstep.models.loading import _backbone

    return _backbone(pipeline)


def conditioning_kind(pipeline: Any) -> tuple[str, int | None, int | None]:
    """``(kind, num_classes, null_class)`` of a pipeline: ``class`` (``num_class_embeds`` K+1, the last one the null
    class of CFG), ``text`` (a text encoder) or ``none``."""
    if getattr(pipeline, "text_encoder", None) is not None or getattr(pipeline, "tokenizer", None) is not None:
        return "text", None, None
    n = getattr(backbone_of(pipeline).config, "num_class_embeds", None)
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
    from fewstep.models.loading import detect_family, latent_shape

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


def _conditions(teacher: Teacher, inputs: EvalInputs, device: torch.device) -> tuple[Conditioning, Conditioning | None]:
    if inputs.labels is not None:
        cond = Conditioning(class_labels=inputs.labels.to(device))
        return cond, teacher.uncond_like(cond)
    if inputs.prompts is not None:
        from fewstep.models.prompts import encode_prompts

        return encode_prompts(teacher, list(inputs.prompts))
    return Conditioning(), None


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------------------------------
# Samplers from fewstep objects (teacher, trained student)
# ---------------------------------------------------------------------------------------------------------------------


def teacher_grid(teacher: Teacher, num_steps: int, num_tokens: int | None = None) -> tuple[Tensor, str]:
    """The teacher's ``num_steps + 1`` levels and the solver's name: its pipeline scheduler's own grid when fewstep
    reproduces that scheduler (DDIM, Euler, FlowMatchEuler), else DDIM on the ``trailing`` grid (VP) or Euler on the
    shifted uniform grid (flow)."""
    from fewstep.noise.timesteps import linspace_grid, trailing_vp_grid
    from fewstep.solvers.grids import SUPPORTED, scheduler_taus

    scheduler = getattr(teacher.pipeline, "scheduler", None)
    name = type(scheduler).__name__
    if scheduler is not None and name in SUPPORTED:
        try:
            solver = "DDIM (η=0)" if teacher.schedule.kind == "vp" else "Euler"
            return scheduler_taus(scheduler, teacher.schedule, num_steps, num_tokens), f"{solver} on {name}'s timesteps"
        except ValueError:
            pass
    if teacher.schedule.kind == "vp":
        return trailing_vp_grid(num_steps, teacher.schedule.num_train_timesteps), "DDIM (η=0), trailing grid"
    return teacher.schedule.shift(linspace_grid(num_steps), num_tokens), "Euler, uniform shifted grid"


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
    """
    w = default_guidance(teacher) if guidance_scale is None else float(guidance_scale)
    if shape is None and teacher.pipeline is None:
        raise ValueError("A custom teacher (no pipeline) needs `shape=`: one image's noise shape, e.g. (1, 8, 8).")
    shape = tuple(shape) if shape is not None else noise_shape(teacher.pipeline, resolution)
    tokens = (shape[-2] // 2) * (shape[-1] // 2) if teacher.family == "flux" else None
    solver = teacher_grid(teacher, 1, tokens)[1]
    device = _device_of(teacher.denoiser)

    def fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        from fewstep.models.loading import decode_latents

        cond, uncond = _conditions(teacher, inputs, device)
        taus = teacher_grid(teacher, num_steps, tokens)[0].to(device)
        x0 = teacher.sample(noise.to(device), cond, taus, uncond, guidance_scale=w)
        return decode_latents(teacher, x0)

    info = {
        "kind": "teacher", "source": source, "weights": "pretrained", "family": teacher.family,
        "guidance_scale": w, "guidance_source": guidance_source or "default for this teacher",
        "scheduler": solver, "prediction_type": teacher.denoiser.prediction_type,
        "schedule": teacher.schedule.kind,
    }  # fmt: skip
    return Sampler(
        name=name or f"teacher ({'DDIM' if teacher.schedule.kind == 'vp' else 'Euler'}, w={w:g})",
        fn=fn, noise_shape=shape, steps=list(steps), network=teacher.denoiser.backbone, info=info,
        schedule=lambda n: {"solver": solver, **_schedule_of(teacher, teacher_grid(teacher, n, tokens)[0])},
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
    """
    teacher, objective = components.teacher, components.objective
    sampler = objective.sampler()
    denoiser = getattr(sampler, "denoiser", components.student.denoiser)
    device = _device_of(denoiser)
    objective_name = getattr(getattr(objective, "config", None), "name", type(objective).__name__.lower())

    def fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        from fewstep.models.loading import decode_latents

        cond, _ = _conditions(teacher, inputs, device)
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
        "guidance_source": "the objective's sampler (recommended for this student)",
        "scheduler": f"fewstep {type(sampler).__name__}", "family": teacher.family,
    }  # fmt: skip
    return Sampler(
        name=name or f"student ({objective_name}, {weights})", fn=fn, steps=list(steps), info=info,
        noise_shape=image_shape,
        network=denoiser.backbone, schedule=schedule,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: Path, checkpoint: str = "latest") -> Path:
    """``latest`` (newest complete), ``best`` (``checkpoints/best``, kept by periodic evaluation) or a path."""
    from fewstep.train.checkpoint import COMPLETE, latest_checkpoint

    if checkpoint == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(
                f"No complete checkpoint in {str(run_dir / 'checkpoints')!r}: nothing to evaluate. Train until the "
                "first checkpoint (train.checkpoint_every); SIGINT/SIGTERM also write one."
            )
        return found
    path = run_dir / "checkpoints" / "best" if checkpoint == "best" else Path(checkpoint)
    if not (path / COMPLETE).is_file():
        hint = "Set eval.every_steps in the recipe to keep one" if checkpoint == "best" else "Pass latest, best or"
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete checkpoint (no {COMPLETE} marker). {hint} a checkpoints/step_XXXXXXXX "
            "directory."
        )
    return path


def apply_ema(groups: dict[str, nn.Module], state: dict[str, Tensor]) -> None:
    """Copy EMA shadows (``{"<group>/<param>": tensor}``, ``ema.safetensors``) into the trainable parameters."""
    with torch.no_grad():
        for key, value in state.items():
            group, param = key.split("/", 1)
            params = dict(groups[group].named_parameters())
            if param not in params:
                raise ValueError(
                    f"EMA weight {key!r} has no parameter in the rebuilt {group!r}: was the recipe edited?"
                )
            params[param].copy_(value.to(params[param].dtype))


def load_components(
    run_dir: str | Path, checkpoint: str = "latest", weights: str = "auto", teacher: Teacher | None = None
) -> tuple[Any, Any, Path, str]:
    """Rebuild a run's components and load a checkpoint's weights (EMA or raw).

    Args:
        run_dir: the run directory (``resolved_config.yaml`` + ``checkpoints/``).
        checkpoint: ``latest``, ``best`` or a checkpoint path.
        weights: ``auto`` (EMA when the checkpoint has ``ema.safetensors``, i.e. the run set ``train.ema_decay``),
            ``ema`` or ``raw``.
        teacher: the run's custom teacher, if it was trained with one.

    Returns:
        ``(recipe, components, checkpoint_dir, weights_used)`` with ``weights_used`` ``"ema"`` or ``"raw"``.
    """
    from safetensors.torch import load_file

    from fewstep.config.load import load_recipe
    from fewstep.export.run import load_trainable
    from fewstep.train.build import build_components
    from fewstep.train.checkpoint import load_trainable_weights

    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw; got {weights!r}.")
    run_dir = Path(run_dir)
    config = run_dir / "resolved_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no resolved_config.yaml, so it is not a fewstep run directory. Pass the recipe's "
            "output_dir (written by `fewstep train`), an export directory or a teacher."
        )
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    recipe = load_recipe(config)
    components = build_components(recipe, teacher=teacher)
    groups = components.objective.trainable()
    trained = load_trainable_weights(ckpt)
    for group, module in groups.items():
        if group not in trained:
            raise ValueError(f"Checkpoint {str(ckpt)!r} has no weights for {group!r} (has {sorted(trained)}).")
        load_trainable(module, trained[group], group)
    ema_file = ckpt / "ema.safetensors"
    if weights == "ema" and not ema_file.is_file():
        raise FileNotFoundError(
            f"{str(ema_file)!r} does not exist: the run kept no EMA (train.ema_decay was null). Use --weights raw."
        )
    used = "ema" if weights != "raw" and ema_file.is_file() else "raw"
    if used == "ema":
        apply_ema(groups, load_file(ema_file))
    components.student.eval()
    return recipe, components, ckpt, used


def _to_device(components: Any, device: torch.device) -> None:
    components.teacher.denoiser.to(device)
    if components.teacher.pipeline is not None and hasattr(components.teacher.pipeline, "to"):
        components.teacher.pipeline.to(device)
    components.student.to(device)


def run_target(
    run_dir: str | Path,
    *,
    steps: Sequence[int] = (1, 2, 4, 8),
    teacher_steps: Sequence[int] = (50,),
    checkpoint: str = "latest",
    weights: str = "auto",
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    teacher: Teacher | None = None,
) -> Target:
    """A training run's student at ``steps`` and its teacher at ``teacher_steps`` (empty: no teacher rows).

    The teacher's ``w``: ``guidance_scale``, else the recipe's ``teacher.guidance_scale`` when it is not 1, else
    ``1 + ω`` at the middle of an LCM-style ``w_min..w_max`` range the student was distilled with, else
    ``default_guidance``.
    """
    run_dir = Path(run_dir)
    recipe, components, ckpt, used = load_components(run_dir, checkpoint, weights, teacher)
    _to_device(components, torch.device(device) if device is not None else default_device())
    shape = run_noise_shape(recipe, components.teacher)
    source = f"{run_dir} ({ckpt.name})"
    samplers = [student_sampler(components, steps, weights=used, source=source, shape=shape)]
    if teacher_steps:
        w, why = _run_guidance(recipe, guidance_scale)
        samplers.append(teacher_sampler(components.teacher, teacher_steps, w, source=recipe.teacher.pretrained,
                                        guidance_source=why, shape=shape))  # fmt: skip
    kind, num_classes = teacher_conditioning(components.teacher)
    dataset = benchmark_of(shape, kind, num_classes)
    info = {"kind": "run", "path": str(run_dir), "checkpoint": str(ckpt), "weights": used,
            "ema_decay": recipe.train.ema_decay, "objective": recipe.objective.name,
            "teacher": recipe.teacher.pretrained, "description": recipe.description,
            "parameters": {"student": _num_parameters(components.student.denoiser.backbone),
                           "teacher": _num_parameters(components.teacher.denoiser.backbone)}}  # fmt: skip
    return Target("run", str(run_dir), samplers, kind, num_classes, dataset, info)


def _num_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (a LoRA student counts its frozen base and its adapters)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def run_noise_shape(recipe: Any, teacher: Teacher) -> tuple[int, ...]:
    """One image's noise shape in a run: the teacher pipeline's latent at ``data.resolution``, or (custom teachers)
    the shape of the run's data."""
    if teacher.pipeline is not None:
        return noise_shape(teacher.pipeline, recipe.data.resolution)
    from fewstep.data.loader import build_batches

    return tuple(build_batches(recipe.data, teacher).preview(1).x0.shape[1:])


def _run_guidance(recipe: Any, guidance_scale: float | None) -> tuple[float | None, str]:
    if guidance_scale is not None:
        return guidance_scale, "given (--guidance)"
    if recipe.teacher.guidance_scale != 1.0:
        return recipe.teacher.guidance_scale, "the recipe's teacher.guidance_scale"
    objective = recipe.objective
    if getattr(objective, "w_max", 0) > 0:
        omega = (objective.w_min + objective.w_max) / 2
        return 1.0 + omega, f"1 + the middle of the distilled ω range [{objective.w_min:g}, {objective.w_max:g}]"
    return None, "default for this teacher"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------------


def teacher_target(
    spec: str,
    *,
    steps: Sequence[int] = (50,),
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
) -> Target:
    """A teacher (hub id, local pipeline, ``tiny:<family>``, ``fewstep:<asset>``) at ``steps`` with its usual CFG."""
    from fewstep.models.loading import load_teacher

    teacher = load_teacher(SimpleNamespace(pretrained=spec, dtype=dtype, guidance_scale=1.0))
    teacher.denoiser.to(torch.device(device) if device is not None else default_device())
    teacher.pipeline.to(_device_of(teacher.denoiser))
    why = "given (--guidance)" if guidance_scale is not None else ""
    sampler = teacher_sampler(teacher, steps, guidance_scale, source=spec, guidance_source=why)
    kind, num_classes, _ = conditioning_kind(teacher.pipeline)
    info = {"kind": "teacher", "spec": spec}
    return Target(
        "teacher", spec, [sampler], kind, num_classes, benchmark_of(sampler.noise_shape, kind, num_classes), info
    )


def export_target(export_dir: str | Path, **kwargs: Any) -> Target:
    """An exported student sampled by stock diffusers (``fewstep.eval.exported.export_target``: ``steps``,
    ``teacher_steps``, ``base``, ``guidance_scale``, ``device``)."""
    from fewstep.eval.exported import export_target as build

    return build(export_dir, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------


def target_kind(spec: str) -> str:
    """``run`` (a directory with ``resolved_config.yaml``), ``export`` (with ``fewstep_student.json``) or
    ``teacher`` (``tiny:``/``fewstep:`` specs, pipeline directories, hub ids).

    Raises:
        FileNotFoundError: a path that does not exist, or a directory that is none of these.
    """
    from fewstep.objectives.spec import SPEC_FILE

    if spec.startswith(("tiny:", "fewstep:")):
        return "teacher"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "resolved_config.yaml").is_file():
            return "run"
        if (path / SPEC_FILE).is_file():
            return "export"
        if (path / "model_index.json").is_file():
            return "teacher"
        raise FileNotFoundError(
            f"{spec!r} is a directory but not a training run (resolved_config.yaml), an export ({SPEC_FILE}) or a "
            "diffusers pipeline (model_index.json). Pass one of those, tiny:<family>, fewstep:<asset> or a hub id."
        )
    looks_like_path = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path:
        raise FileNotFoundError(
            f"Evaluation target {spec!r} does not exist. Pass a training run directory, an export directory, a "
            "pipeline directory, tiny:<family>, fewstep:<asset> or a hub id."
        )
    return "teacher"


def load_target(
    spec: str,
    *,
    steps: Sequence[int] | None = None,
    teacher_steps: Sequence[int] = (50,),
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    checkpoint: str = "latest",
    weights: str = "auto",
    base: str | None = None,
) -> Target:
    """Any target (``target_kind``). ``steps`` are the student's (default 1,2,4,8), or the teacher's for a teacher
    target (default ``teacher_steps``); ``teacher_steps`` empty skips the reference teacher rows."""
    kind = target_kind(spec)
    if kind == "run":
        return run_target(spec, steps=steps or (1, 2, 4, 8), teacher_steps=teacher_steps, checkpoint=checkpoint,
                          weights=weights, guidance_scale=guidance_scale, device=device)  # fmt: skip
    if kind == "export":
        return export_target(spec, steps=steps or (1, 2, 4, 8), teacher_steps=teacher_steps, base=base,
                             guidance_scale=guidance_scale, device=device)  # fmt: skip
    return teacher_target(spec, steps=steps or teacher_steps or (50,), guidance_scale=guidance_scale, device=device)
