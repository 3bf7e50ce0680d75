"""Recipe → (teacher, student, objective). The one place where the three meet before training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel

from fewstep.data.video_folder import prepare_video_data
from fewstep.models.student import Student, enable_gradient_checkpointing
from fewstep.models.teacher import Teacher
from fewstep.objectives import OBJECTIVES, Objective

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe, StudentConfig


@dataclass
class Components:
    """What a run trains: the frozen teacher, the student and the objective that ties them together."""

    teacher: Teacher
    student: Student
    objective: Objective


def build_student(student_cfg: StudentConfig, teacher: Teacher) -> Student:
    """``Student.lora`` or ``Student.full`` from the recipe's ``student`` block; trainable weights are kept in fp32
    (the frozen base may be bf16/fp16, mixed precision comes from ``train.mixed_precision``)."""
    if student_cfg.kind == "lora":
        lora = student_cfg.lora
        student = Student.lora(teacher, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
    elif student_cfg.kind == "full":
        student = Student.full(teacher)
    else:
        raise ValueError(f"student.kind {student_cfg.kind!r} is not one of lora, full.")
    for p in student.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if student_cfg.gradient_checkpointing:
        backbone = student.denoiser.backbone
        if not hasattr(backbone, "enable_gradient_checkpointing"):
            raise ValueError(
                f"student.gradient_checkpointing=true, but {type(backbone).__name__} has no "
                "`enable_gradient_checkpointing()`. Set it to false."
            )
        enable_gradient_checkpointing(backbone)  # recomputed under the adapter each block ran with
    return student


def objective_config(recipe: Recipe) -> BaseModel:
    """The objective block validated into its own ``Config`` (already done by the recipe schema when it is typed)."""
    cls = OBJECTIVES.get(recipe.objective.name)
    block = recipe.objective
    if isinstance(block, cls.Config):
        return block
    data = block.model_dump() if hasattr(block, "model_dump") else dict(block)
    return cls.Config.model_validate(data)


def build_components(recipe: Recipe, teacher: Teacher | None = None) -> Components:
    """Load the teacher (``fewstep.models.loading.load_teacher``), build the student and the objective.

    Args:
        recipe: a validated ``Recipe``.
        teacher: a ready teacher (e.g. ``Teacher.from_module`` for a custom model) instead of ``recipe.teacher``.
    """
    if teacher is None:
        from fewstep.models.loading import load_teacher

        teacher = load_teacher(recipe.teacher)
    prepare_video_data(recipe.data, teacher)  # a clip shape the VAE cannot take fails before the student is built
    student = build_student(recipe.student, teacher)
    name = recipe.objective.name
    cls = OBJECTIVES.get(name)
    try:
        objective = cls(objective_config(recipe), teacher=teacher, student=student)
    except ValueError as err:
        raise ValueError(
            f"Objective {name!r} does not fit this teacher ({recipe.teacher.pretrained!r}, family "
            f"{teacher.family!r}, {teacher.schedule.kind} schedule, {teacher.denoiser.prediction_type} prediction): "
            f"{err} Fix: change the objective's settings as said, or pick an objective that supports this teacher "
            "(`fewstep recipes` lists working pairs)."
        ) from err
    return Components(teacher, student, objective)
