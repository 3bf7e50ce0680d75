"""What the trainer asks of a periodic evaluator (``eval.every_steps``), so that training never imports evaluation.

``train(recipe, evaluator=factory)`` calls ``factory(recipe, components, run_dir, weights, resumed)`` once at startup;
the factory returns a ``PeriodicEvaluator`` (or ``None`` when the recipe asks for no evaluation). ``fewstep train``
and the quickstart pass ``fewstep.eval.periodic.periodic_evaluator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from fewstep.train.build import Components


class PeriodicEvaluator(Protocol):
    """Evaluates the student during training and keeps the best checkpoint."""

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step``."""

    def run(self, step: int) -> tuple[dict[str, float], bool]:
        """Evaluate the weights the student holds now (main process only). Returns ``(scalars, improved)``: scalars
        for the trackers, and whether this is the best evaluation so far (the trainer then checkpoints this step and
        calls ``keep_best``)."""

    def keep_best(self, checkpoint: Path) -> Path:
        """Keep ``checkpoint`` (this step's) as the run's best checkpoint; returns where it is kept."""


class EvaluatorFactory(Protocol):
    """Builds a run's ``PeriodicEvaluator`` at startup (on every rank), or ``None`` for no evaluation.

    Args:
        recipe: the run's recipe (``recipe.eval`` says what and when to evaluate).
        components: the run's teacher, student and objective.
        run_dir: the run directory.
        weights: ``ema`` or ``raw``: the weights the trainer loads while evaluating.
        resumed: whether the run resumed from a checkpoint.
    """

    def __call__(
        self, recipe: Any, components: Components, run_dir: Path, weights: str, resumed: bool
    ) -> PeriodicEvaluator | None: ...
