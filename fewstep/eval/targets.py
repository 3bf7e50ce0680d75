"""What ``fewstep eval TARGET`` evaluates: harness ``Sampler``s with their provenance, from

* a training run directory (``run_target``): the student of a checkpoint (``fewstep.train.run.load_run``: EMA weights
  when the run kept them) and, for reference, the run's teacher at its usual steps with CFG;
* an exported student directory (``export_target``): a LoRA on its base pipeline or a merged pipeline, sampled by
  stock diffusers with the exported scheduler (``fewstep.eval.exported``);
* a teacher (``teacher_target``): a hub id, a local pipeline, ``tiny:<family>`` or ``fewstep:<asset>``.

``load_target(spec, ...)`` picks the kind. The samplers themselves live in ``fewstep.eval.samplers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fewstep.eval.exported import load_export
from fewstep.eval.harness import EvalInputs, Sampler, conditioned_inputs
from fewstep.eval.samplers import (
    FirstFrames,
    conditioning_kind,
    default_device,
    num_parameters,
    run_noise_shape,
    student_sampler,
    teacher_conditioning,
    teacher_sampler,
)
from fewstep.eval.suite import benchmark_of
from fewstep.models.teacher import Teacher
from fewstep.train.run import load_run

TEACHER_STEPS = 50  # a teacher's step count when none is given (the reference rows of `fewstep eval`, `fewstep sample`)


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
        recommended_steps: the step count to sample the first model at when none is given: a student's
            (``sampling_spec().recommended_steps``, as exported), ``TEACHER_STEPS`` for a teacher; ``None`` if unknown.
        teacher: the teacher's ``Sampler`` (the run's teacher with its guidance, the export's base, the teacher
            itself), whether or not its rows are in ``samplers``; ``None`` when it was not loaded.
    """

    kind: str
    source: str
    samplers: list[Sampler]
    conditioning: str
    num_classes: int | None = None
    dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    recommended_steps: int | None = None
    teacher: Sampler | None = None

    def inputs(self, num_samples: int, prompts: Sequence[str] | None = None) -> EvalInputs:
        """Balanced labels (class-conditional), cycled ``prompts`` (text; default ``DEFAULT_PROMPTS``) or none."""
        return conditioned_inputs(self.conditioning, num_samples, self.num_classes, prompts)


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


def run_target(
    run_dir: str | Path,
    *,
    steps: Sequence[int] = (1, 2, 4, 8),
    teacher_steps: Sequence[int] = (50,),
    checkpoint: str | Path = "latest",
    weights: str = "auto",
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    teacher: Teacher | None = None,
    student_guidance: float | None = None,
    images: FirstFrames = None,
) -> Target:
    """A training run's student at ``steps`` and its teacher at ``teacher_steps`` (empty: no teacher rows).

    The student's weights come from ``fewstep.train.run.load_run(run_dir, checkpoint, weights)`` (``auto``: EMA when
    the run kept it). The teacher's ``w``: ``guidance_scale``, else the recipe's ``teacher.guidance_scale`` when it is
    not 1, else ``1 + ω`` at the middle of an LCM-style ``w_min..w_max`` range the student was distilled with, else
    ``default_guidance``. The student samples with the ``w`` its objective's sampler recommends, or
    ``student_guidance`` (``student_sampler``). ``images``: the first frames of an image-to-video run, for the student
    and the teacher alike (``fewstep.eval.samplers.FirstFrames``).
    """
    run = load_run(run_dir, checkpoint, weights, teacher)
    recipe, components = run.recipe, run.components
    _to_device(components, torch.device(device) if device is not None else default_device())
    shape = run_noise_shape(recipe, components.teacher)
    source = f"{run.run_dir} ({run.checkpoint.name})"
    samplers = [student_sampler(components, steps, weights=run.weights, source=source, shape=shape,
                                guidance_scale=student_guidance, images=images)]  # fmt: skip
    w, why = _run_guidance(recipe, guidance_scale)
    teacher_rows = teacher_sampler(components.teacher, teacher_steps or [TEACHER_STEPS], w,
                                   source=recipe.teacher.pretrained, guidance_source=why, shape=shape,
                                   images=images)  # fmt: skip
    if teacher_steps:
        samplers.append(teacher_rows)
    kind, num_classes = teacher_conditioning(components.teacher)
    dataset = benchmark_of(shape, kind, num_classes)
    info = {"kind": "run", "path": str(run.run_dir), "checkpoint": str(run.checkpoint), "weights": run.weights,
            "ema_decay": recipe.train.ema_decay, "objective": recipe.objective.name,
            "teacher": recipe.teacher.pretrained, "description": recipe.description,
            "parameters": {"student": num_parameters(components.student.denoiser.backbone),
                           "teacher": num_parameters(components.teacher.denoiser.backbone)}}  # fmt: skip
    return Target("run", str(run.run_dir), samplers, kind, num_classes, dataset, info,
                  recommended_steps=recommended_steps(components.objective), teacher=teacher_rows)  # fmt: skip


def recommended_steps(objective: Any) -> int | None:
    """The step count a student is advertised at (its ``sampling_spec()``, as an export writes it); ``None`` when
    no diffusers scheduler describes its teacher's schedule (a custom teacher)."""
    try:
        return int(objective.sampling_spec().recommended_steps)
    except ValueError:  # e.g. a custom teacher's schedule that no exportable scheduler describes
        return None


def _to_device(components: Any, device: torch.device) -> None:
    components.teacher.denoiser.to(device)
    if components.teacher.pipeline is not None and hasattr(components.teacher.pipeline, "to"):
        components.teacher.pipeline.to(device)
    components.student.to(device)


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


# ---------------------------------------------------------------------------------------------------------------------
# Teachers and exports
# ---------------------------------------------------------------------------------------------------------------------


def teacher_target(
    spec: str,
    *,
    steps: Sequence[int] = (50,),
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    shape: Sequence[int] | None = None,
    images: FirstFrames = None,
) -> Target:
    """A teacher (hub id, local pipeline, ``tiny:<family>``, ``fewstep:<asset>``) at ``steps`` with its usual CFG;
    ``shape``: one image's noise shape (default: the pipeline's latent at its default size); ``images``: an
    image-to-video teacher's first frames."""
    from fewstep.models.loading import load_teacher

    teacher = load_teacher(SimpleNamespace(pretrained=spec, dtype=dtype, guidance_scale=1.0))
    device = torch.device(device) if device is not None else default_device()
    teacher.denoiser.to(device)
    teacher.pipeline.to(device)
    why = "given (--guidance)" if guidance_scale is not None else ""
    sampler = teacher_sampler(teacher, steps, guidance_scale, source=spec, guidance_source=why, shape=shape,
                              images=images)  # fmt: skip
    kind, num_classes, _ = conditioning_kind(teacher.pipeline)
    info = {"kind": "teacher", "spec": spec}
    dataset = benchmark_of(sampler.noise_shape, kind, num_classes)
    return Target("teacher", spec, [sampler], kind, num_classes, dataset, info, recommended_steps=TEACHER_STEPS,
                  teacher=sampler)  # fmt: skip


def export_target(
    export_dir: str | Path,
    *,
    steps: Sequence[int] = (1, 2, 4, 8),
    teacher_steps: Sequence[int] = (),
    base: str | None = None,
    guidance_scale: float | None = None,
    device: str | torch.device | None = None,
    student_guidance: float | None = None,
) -> Target:
    """An exported student sampled by stock diffusers (``fewstep.eval.exported.load_export``), and optionally its
    base teacher at ``teacher_steps``.

    Args:
        export_dir: a directory written by ``fewstep export``.
        steps: student step counts; each must be one the export lists (``fewstep_student.json``).
        teacher_steps: step counts of the base teacher (needs ``base`` or the card's ``base_model``).
        base: the base pipeline of a LoRA (default: the card's ``base_model``).
        guidance_scale: the teacher's ``w``; the student uses the exported ``guidance_scale``.
        device: where to sample.
        student_guidance: the student's ``guidance_scale`` instead of the exported one.
    """
    export_dir = Path(export_dir)
    device = torch.device(device) if device is not None else default_device()
    exported = load_export(export_dir, steps=steps, base=base, device=device, guidance_scale=student_guidance)
    samplers: list[Sampler] = [exported.sampler]
    teacher = None
    if teacher_steps:
        if not exported.base:
            raise ValueError(f"No base model known for {str(export_dir)!r}: pass --base, or --no-teacher.")
        teacher = teacher_target(exported.base, steps=teacher_steps, guidance_scale=guidance_scale, device=device,
                                 shape=exported.sampler.noise_shape).teacher  # fmt: skip
        samplers.append(teacher)
    info = {"kind": "export", "path": str(export_dir), "layout": exported.layout, "base": exported.base,
            "spec": exported.spec.to_json()}  # fmt: skip
    dataset = benchmark_of(exported.sampler.noise_shape, exported.conditioning, exported.num_classes)
    return Target("export", str(export_dir), samplers, exported.conditioning, exported.num_classes, dataset, info,
                  recommended_steps=exported.spec.recommended_steps, teacher=teacher)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------------


def target_kind(spec: str, what: str = "Evaluation target") -> str:
    """``run`` (a directory with ``resolved_config.yaml``), ``export`` (with ``fewstep_student.json``) or
    ``teacher`` (``tiny:``/``fewstep:`` specs, pipeline directories, hub ids). ``what`` names the target in errors.

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
            f"{what} {spec!r} does not exist. Pass a training run directory, an export directory, a "
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
    student_guidance: float | None = None,
    what: str = "Evaluation target",
    images: FirstFrames = None,
) -> Target:
    """Any target (``target_kind``). ``steps`` are the student's (default 1,2,4,8), or the teacher's for a teacher
    target (default ``teacher_steps``, else ``TEACHER_STEPS``); ``teacher_steps`` empty skips the reference teacher
    rows. ``guidance_scale`` is a teacher's ``w``; ``student_guidance`` replaces a student's recommended one. ``what``
    names the target in errors. ``images``: first frames of an image-to-video run or teacher."""
    kind = target_kind(spec, what)
    if kind == "run":
        return run_target(spec, steps=steps or (1, 2, 4, 8), teacher_steps=teacher_steps, checkpoint=checkpoint,
                          weights=weights, guidance_scale=guidance_scale, device=device,
                          student_guidance=student_guidance, images=images)  # fmt: skip
    if kind == "export":
        if images is not None:
            raise ValueError(f"First frames (--images) are for training runs and teachers; the export {spec!r} is "
                             "sampled by a stock text-to-image pipeline. Evaluate the run it came from.")  # fmt: skip
        return export_target(spec, steps=steps or (1, 2, 4, 8), teacher_steps=teacher_steps, base=base,
                             guidance_scale=guidance_scale, device=device,
                             student_guidance=student_guidance)  # fmt: skip
    return teacher_target(spec, steps=steps or teacher_steps or (TEACHER_STEPS,), guidance_scale=guidance_scale,
                          device=device, images=images)  # fmt: skip
