"""The Objective protocol: every member the trainer, export and evaluation use, in one place.

Objectives are not subclasses of anything: each file is self-contained, declares a pydantic ``Config`` (its recipe
block, discriminated on ``name``) and registers itself in ``OBJECTIVES``. The trainer owns accelerate, optimizers,
checkpoints and logging; an objective owns its losses, its phases, its target networks and how its student is
sampled and exported. docs/objectives.md walks through writing one.

Lifecycle of one run (``fewstep.train.loop.Trainer``):

1. ``cls(config, teacher=teacher, student=student)`` (``fewstep.train.build.build_components``);
2. one optimizer per ``trainable()`` group, which also trains that group's ``auxiliary()`` module; the groups go
   through ``accelerator.prepare`` and ``attach(prepared)`` receives them; a resume loads the weights and calls
   ``load_state_dict``; then ``prepare(batches)`` runs once, before the first loss;
3. every step: ``phase(step)``, ``loss(batch, step, phase)`` per micro-batch, the phase's optimizer step, EMA, then
   ``on_step_end(step, phase)``;
4. sample grids and evaluation call ``sampler()``; export calls ``sampling_spec()`` and ``export_extra()``.

``fewstep plan`` also reads an optional ``backbone_use()`` (``BackboneUse`` per phase) to size activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.models.conditioning import Conditioning
from fewstep.registry import Registry

if TYPE_CHECKING:
    from fewstep.models.student import Student
    from fewstep.objectives.spec import SamplingSpec


@dataclass
class LossOutput:
    """A scalar loss to backpropagate for the current phase and detached scalars to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneUse:
    """How one phase of an objective uses the backbone in a micro-step, for memory planning (``fewstep plan``).

    An objective may declare it with an optional ``backbone_use() -> dict[phase, BackboneUse]``; without one every
    phase counts as one plain forward with gradients. The trainer never reads it.

    Attributes:
        graphs: backbone forwards whose activations are kept for the phase's backward, in micro-batches (a forward on
            twice the batch counts 2; a frozen network differentiated for its input counts too).
        no_grad_batch: the largest batch of a forward without gradients in the phase (a teacher's), in micro-batches:
            2 for a teacher run on ``[uncond, cond]`` for classifier-free guidance, 0 when there is none.
    """

    graphs: float = 1.0
    no_grad_batch: float = 1.0


@runtime_checkable
class StudentSampler(Protocol):
    """Draws student samples: ``sampler(noise, cond, num_steps, generator) -> x0`` with noise ``[b, ...]``."""

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor: ...


@runtime_checkable
class StudentWriter(Protocol):
    """Writes a student the way ``fewstep export`` writes the main one: ``write(student, out_dir) -> path``
    (a LoRA file where the teacher's pipeline loads LoRAs, a merged pipeline otherwise). Handed to
    ``Objective.export_extra`` so an objective can export further students without importing ``fewstep.export``."""

    def __call__(self, student: Student, out_dir: Path) -> Path: ...


@runtime_checkable
class Objective(Protocol):
    """What an objective gives the trainer, export and evaluation (every shipped objective implements all of it).

    Attributes:
        Config: the pydantic model of the objective's recipe block (``name: Literal["<registered name>"]`` plus its
            own keys, ``extra="forbid"``).
        bypasses_prepared: ``True`` when the objective calls its trainable modules directly instead of the prepared
            (DDP-wrapped) ones, e.g. a JVP through the student (``torch.func.jvp`` cannot pass through DDP's
            wrapper). The trainer then averages the phase's gradients over ranks itself (``fewstep.train.sync``)
            and refuses sharded strategies (FSDP, DeepSpeed). ``False`` for almost every objective.
    """

    Config: ClassVar[type[BaseModel]]
    bypasses_prepared: ClassVar[bool]

    def trainable(self) -> dict[str, nn.Module]:
        """The trainable groups, one optimizer each: ``{"student": ...}`` or ``{"student": ..., "fake_score": ...}``.

        Only parameters with ``requires_grad`` train; they are checkpointed, averaged by EMA (``train.ema_decay``)
        and, for the student, exported. Two groups must not share a parameter.
        """

    def auxiliary(self) -> dict[str, nn.Module]:
        """Modules the loss trains that are not part of any sampled network, by the group whose optimizer trains
        them, e.g. sCM's adaptive loss weighting ``{"student": weighting}``; ``{}`` for most objectives.

        The trainer adds their parameters to that group's optimizer (and gradient clipping), averages their gradients
        over ranks, keeps EMA shadows of them and checkpoints them under ``auxiliary/<group>.safetensors``. They are
        never wrapped by accelerate, sampled or exported.
        """

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        """Receive the trainer's prepared (e.g. DDP-wrapped) versions of ``trainable()``, same keys.

        Forwards that need gradients must go through these so gradients synchronise across ranks (see
        ``bypasses_prepared`` for objectives that cannot).
        """

    def prepare(self, batches: Iterator[Batch]) -> None:
        """One-time work before the first ``loss`` (after ``attach`` and after a resume has loaded the weights and
        ``load_state_dict``), e.g. TBCM's teacher rollouts into its trajectory cache.

        Args:
            batches: the run's training stream; every batch taken here is one the training steps do not see
                (checkpoints record the position, so a resume continues after them). Most objectives take none
                and do nothing.
        """

    def phase(self, step: int) -> str:
        """Which trainable group updates at ``step`` (a key of ``trainable()``)."""

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """The loss of one micro-batch for ``phase``; its gradient reaches that group (and its auxiliary module)."""

    def on_step_end(self, step: int, phase: str) -> None:
        """After the optimizer step of ``phase`` (and the trainer's EMA): target networks, curricula."""

    def sampler(self) -> StudentSampler:
        """How the student is sampled (sample grids, evaluation, the exported scheduler's reference)."""

    def sampling_spec(self) -> SamplingSpec:
        """The student's sampling schedule as a stock diffusers scheduler (``fewstep.objectives.spec``): what
        export writes to ``scheduler/`` and ``fewstep_student.json``."""

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Write the files this objective owns next to the exported student (AGD's adapters, the guidance
        embedding, Phased DMD's further experts through ``write_student``); nothing for most objectives."""

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs besides the trainable and auxiliary weights and optimizers (EMA targets,
        counters, generators)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` on resume (before ``prepare``)."""


OBJECTIVES: Registry[type] = Registry("objective")
