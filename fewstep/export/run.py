"""Export a trained student: from objects (``export_student``) or from a run directory (``export_run``).

Layout of an export directory:

* ``pytorch_lora_weights.safetensors`` (LoRA students with ``export.lora``): ``pipe.load_lora_weights(dir)``;
  with ``export.kohya`` also ``pytorch_lora_weights_kohya.safetensors`` (kohya / ComfyUI keys, UNet models);
* the merged pipeline (full students, or ``export.merged``): in the directory itself for a full student (so it
  loads with ``DiffusionPipeline.from_pretrained(dir)``), in ``merged/`` next to a LoRA;
* ``scheduler/scheduler_config.json``: the student's diffusers scheduler; ``fewstep_student.json``: the exact
  schedules, recommended steps and guidance with their convention; ``README.md``: the model card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from fewstep.export.card import write_card
from fewstep.export.lora import save_kohya, save_lora, save_merged, save_student
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.objectives.protocol import Objective
from fewstep.objectives.spec import SamplingSpec, write_schedule

logger = logging.getLogger(__name__)


def sampling_spec(objective: Objective) -> SamplingSpec:
    """The objective's ``sampling_spec()``: how its student is sampled with a stock diffusers scheduler."""
    return objective.sampling_spec()


def export_student(
    student: Student,
    teacher: Teacher,
    objective: Any,
    out_dir: str | Path,
    *,
    lora: bool = True,
    merged: bool = False,
    kohya: bool = False,
    base_model: str | None = None,
    description: str = "",
    metrics: dict[str, dict[int, float]] | None = None,
) -> Path:
    """Write the LoRA and/or merged pipeline, the scheduler config and spec, and the model card.

    Args:
        student, teacher, objective: the trained components (``build_components`` + loaded weights).
        out_dir: the export directory (created).
        lora: write ``pytorch_lora_weights.safetensors`` for a LoRA student.
        merged: also write a merged pipeline for a LoRA student (a full student is always written merged).
        kohya: also write the LoRA with kohya / ComfyUI keys (UNet pipelines).
        base_model: the teacher's hub id or path for the card (default: the pipeline's ``name_or_path``).
        description: free text for the card.
        metrics: optional eval table for the card, ``{metric: {num_steps: value}}``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = sampling_spec(objective)
    pipe_cls = type(teacher.pipeline)
    wrote_lora = False
    if student.is_lora and lora:
        if hasattr(pipe_cls, "save_lora_weights"):
            save_lora(student, teacher, out_dir)
            wrote_lora = True
            if kohya:
                save_kohya(student, teacher, out_dir)
        else:
            logger.warning("%s cannot load LoRA files; writing a merged pipeline instead.", pipe_cls.__name__)
    merged_dir = None
    if not wrote_lora or merged:
        merged_dir = out_dir / "merged" if wrote_lora else out_dir
        save_merged(student, teacher, merged_dir, scheduler=spec.scheduler())
    write_schedule(spec, out_dir)
    objective.export_extra(out_dir, lambda extra, path: save_student(extra, teacher, path))  # e.g. AGD adapters
    base = base_model or getattr(teacher.pipeline, "name_or_path", None) or "<base model>"
    write_card(
        out_dir, spec, pipeline_class=pipe_cls.__name__, base_model=str(base), student_path=str(out_dir),
        lora=wrote_lora, merged_path=str(merged_dir) if merged_dir is not None else None,
        description=description, metrics=metrics,
    )  # fmt: skip
    return out_dir


def load_trainable(module: nn.Module, state: dict[str, Any], name: str) -> None:
    """Load checkpointed trainable weights; every trainable parameter must be covered and no key left over."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    uncovered = sorted(trainable & set(missing))
    if unexpected or uncovered:
        raise ValueError(
            f"Checkpoint weights for {name!r} do not match the rebuilt model: unexpected keys {unexpected[:5]}, "
            f"trainable parameters without weights {uncovered[:5]}. Was the run's resolved_config.yaml edited?"
        )


def load_run(run_dir: str | Path, teacher: Teacher | None = None) -> tuple[Any, Any]:
    """Rebuild a run's teacher, student and objective and load its newest checkpoint's trainable weights.

    Args:
        run_dir: the run directory (the recipe's ``output_dir``).
        teacher: the run's custom teacher (``Teacher.from_module``), if it was trained with one.

    Returns:
        ``(recipe, components)``: the run's resolved recipe and ``fewstep.train.build.Components`` with trained
        weights (the student in eval mode).

    Raises:
        FileNotFoundError: no resolved config or no complete checkpoint in ``run_dir``.
    """
    run_dir = Path(run_dir)
    config = run_dir / "resolved_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no resolved_config.yaml, so it is not a fewstep run directory. Pass the "
            "recipe's output_dir (written by `fewstep train`)."
        )
    from fewstep.train.checkpoint import latest_checkpoint, load_trainable_weights

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No complete checkpoint in {str(run_dir / 'checkpoints')!r}: nothing to load. Train until the first "
            "checkpoint (train.checkpoint_every) or resume the run; SIGINT/SIGTERM also write one."
        )
    from fewstep.config.load import load_recipe
    from fewstep.train.build import build_components

    recipe = load_recipe(config)
    components = build_components(recipe, teacher=teacher)
    weights = load_trainable_weights(checkpoint)
    for name, module in components.objective.trainable().items():
        if name not in weights:
            raise ValueError(f"Checkpoint {str(checkpoint)!r} has no weights for {name!r} (has {sorted(weights)}).")
        load_trainable(module, weights[name], name)
    components.student.eval()
    logger.info("Loaded %s", checkpoint)
    return recipe, components


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the newest checkpoint of a training run.

    Rebuilds teacher, student and objective from ``<run_dir>/resolved_config.yaml``, loads the newest checkpoint's
    trainable weights (``load_run``), and writes what the recipe's ``export`` block asks for (``export_student``).

    Args:
        run_dir: the run directory (the recipe's ``output_dir``).
        out_dir: where to write; ``<run_dir>/export`` by default.

    Raises:
        FileNotFoundError: no resolved config or no complete checkpoint in ``run_dir``.
    """
    recipe, components = load_run(run_dir)
    return export_student(
        components.student, components.teacher, components.objective, out_dir or Path(run_dir) / "export",
        lora=recipe.export.lora, merged=recipe.export.merged, kohya=recipe.export.kohya,
        base_model=recipe.teacher.pretrained,
        description=recipe.description,
    )  # fmt: skip
