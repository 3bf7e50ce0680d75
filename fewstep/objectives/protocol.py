"""The Objective protocol (DESIGN §4). Objectives are not subclasses of anything: each file is self-contained,
declares a pydantic ``Config`` (its recipe block, discriminated on ``name``) and registers itself in ``OBJECTIVES``.

The trainer owns accelerate, optimizers, checkpoints and logging; an objective owns its losses, its phases, its
target networks and how its student is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.models.conditioning import Conditioning
from fewstep.registry import Registry


@dataclass
class LossOutput:
    """A scalar loss to backpropagate for the current phase and detached scalars to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class StudentSampler(Protocol):
    """Draws student samples: ``sampler(noise, cond, num_steps, generator) -> x0`` with noise ``[b, ...]``."""

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor: ...


@runtime_checkable
class Objective(Protocol):
    Config: ClassVar[type[BaseModel]]

    def trainable(self) -> dict[str, nn.Module]:
        """One optimizer per key, e.g. ``{"student": ...}`` or ``{"student": ..., "fake_score": ...}``."""

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        """Receive the trainer's prepared (e.g. DDP-wrapped) versions of ``trainable()``; forwards that need
        gradients must go through these so gradients synchronise across ranks. An objective that cannot (a JVP
        through the student) sets the class attribute ``bypasses_prepared = True`` and the trainer averages its
        gradients over ranks itself (``fewstep.train.sync``)."""

    def phase(self, step: int) -> str:
        """Which trainable group updates at ``step`` (a key of ``trainable()``)."""

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput: ...

    def on_step_end(self, step: int, phase: str) -> None:
        """After the optimizer step of ``phase``: EMA / target nets / curricula."""

    def sampler(self) -> StudentSampler: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs besides the trainable weights and optimizers (EMA targets, counters)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


OBJECTIVES: Registry[type] = Registry("objective")
