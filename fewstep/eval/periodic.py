"""Periodic evaluation during training (``eval.every_steps``): the evaluator the trainer is given.

``fewstep train`` and the quickstart pass ``periodic_evaluator`` to ``fewstep.train.loop.train(...,
evaluator=periodic_evaluator)``; it builds a ``PeriodicEval`` for runs that set ``eval.every_steps``
(``fewstep.train.evaluator.EvaluatorFactory``). The trainer itself imports nothing from ``fewstep.eval``.

Every ``every_steps`` the main process samples the current student (EMA weights when the run keeps them) at each of
``eval.steps`` from the same seeded noise and labels / prompts (``fewstep.eval.harness.evaluate``), writes the report
to ``<run>/eval/step_XXXXXXXX/`` and returns scalars ``eval/<metric>@<steps>`` for the trackers (tensorboard).

The best checkpoint by ``eval.best_metric`` at ``eval.best_steps`` is kept in ``<run>/checkpoints/best/``: a
complete checkpoint (hard links to the step's files, so it costs no space while that step also exists) plus
``best.json`` (step, metric, value, report). Pruning (``train.keep_last``) only touches ``step_*`` directories, so
the best is never pruned; a resumed run reads ``best.json`` and keeps comparing against it.

Which metrics: ``eval.metrics``, or the benchmark metrics of the teacher's images (digits teachers: FID in the
digits classifier's feature space and class accuracy). If none can be built, ``periodic_evaluator`` fails at
startup with one error that says what to set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.eval.harness import EvalInputs, conditioned_inputs, evaluate
from fewstep.eval.metric import Metric
from fewstep.eval.samplers import run_noise_shape, student_sampler, teacher_conditioning
from fewstep.eval.suite import COLUMNS, benchmark_of, build_metrics
from fewstep.train.build import Components
from fewstep.train.checkpoint import BEST

BEST_FILE = "best.json"


@dataclass
class Best:
    """The best evaluation so far: ``value`` of ``key`` (``fid@4``) at ``step``."""

    step: int
    key: str
    value: float
    higher_is_better: bool

    def beaten_by(self, value: float) -> bool:
        return value > self.value if self.higher_is_better else value < self.value


class PeriodicEval:
    """Evaluates a run's student every ``cfg.every_steps`` and keeps its best checkpoint.

    Args:
        cfg: the recipe's ``eval`` block.
        run_dir: the run directory.
        sampler: the student's harness ``Sampler`` (``fewstep.eval.samplers.student_sampler``), steps ``cfg.steps``.
        metrics: the metrics (at least one).
        inputs: labels / prompts of the evaluation images.
        weights: ``ema`` or ``raw`` (what the trainer applies while evaluating; recorded in the reports).
        resumed: whether the run resumed (a ``best.json`` of a previous, non-resumed run is ignored).
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        sampler: Any,
        metrics: list[Metric],
        inputs: EvalInputs,
        weights: str,
        resumed: bool,
    ) -> None:
        self.cfg, self.run_dir, self.sampler, self.metrics, self.inputs = cfg, Path(run_dir), sampler, metrics, inputs
        self.weights = weights
        by_name = {m.name: m for m in metrics}
        metric = by_name[COLUMNS[cfg.best_metric]] if cfg.best_metric is not None else metrics[0]
        self.best_steps = cfg.best_steps if cfg.best_steps is not None else max(cfg.steps)
        self.best_key = f"{metric.name}@{self.best_steps}"
        self.higher_is_better = metric.higher_is_better if cfg.best_mode == "auto" else cfg.best_mode == "max"
        self.best = read_best(self.run_dir) if resumed else None
        if self.best is not None and (self.best.key, self.best.higher_is_better) != (
            self.best_key,
            self.higher_is_better,
        ):
            self.best = None  # the recipe now ranks by another metric or direction: start over

    @classmethod
    def build(
        cls,
        recipe: Any,
        components: Components,
        run_dir: Path,
        noise_shape: tuple[int, ...],
        weights: str,
        resumed: bool,
    ) -> PeriodicEval | None:
        """The periodic evaluation of a recipe, or ``None`` without ``eval.every_steps``.

        Raises:
            ValueError: ``eval.every_steps`` is set but no metric can be built (names the fix).
        """
        cfg = recipe.eval
        if cfg.every_steps is None:
            return None
        kind, num_classes = teacher_conditioning(components.teacher)
        dataset = benchmark_of(noise_shape, kind, num_classes)
        try:
            metrics = build_metrics(cfg.metrics, dataset, kind, device=_device(components))
        except ValueError as err:
            raise ValueError(
                f"eval.every_steps={cfg.every_steps}: {err} Fix eval.metrics or unset eval.every_steps."
            ) from err
        if not metrics:
            raise ValueError(
                f"eval.every_steps={cfg.every_steps} but no evaluation metric is available for this teacher "
                f"({recipe.teacher.pretrained!r}: {kind}-conditioned images of shape {list(noise_shape)}). Built-in "
                "metrics cover the benchmark data sets (digits, fashion_mnist: class-conditional pixel teachers) and "
                "CLIP score (text models, eval.metrics: [clip]). Set eval.metrics to ones that apply, or unset "
                "eval.every_steps (sample grids: train.sample_every)."
            )
        sampler = student_sampler(components, cfg.steps, weights=weights, source=str(run_dir), shape=noise_shape,
                                  resolution=recipe.data.resolution)  # fmt: skip
        return cls(cfg, run_dir, sampler, metrics, _inputs(recipe, kind, num_classes), weights, resumed)

    def due(self, step: int) -> bool:
        return self.cfg.every_steps is not None and step % self.cfg.every_steps == 0

    def run(self, step: int, progress: bool = False) -> tuple[dict[str, float], bool]:
        """Evaluate now (with the weights currently loaded). Returns ``(scalars, improved)``; ``improved`` means the
        caller should checkpoint this step and call ``keep_best``."""
        began = time.perf_counter()
        out = self.run_dir / "eval" / f"step_{step:08d}"
        report = evaluate(
            [self.sampler], self.metrics, self.inputs, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
            out_dir=out, save_images=self.cfg.save_images, progress=progress,
            info={"target": {"kind": "training", "run": str(self.run_dir), "step": step, "weights": self.weights}},
        )  # fmt: skip
        scalars = {f"eval/{name}@{row.num_steps}": value for row in report.rows for name, value in row.metrics.items()}
        scalars["eval/seconds"] = time.perf_counter() - began
        value = scalars[f"eval/{self.best_key}"]
        improved = self.best is None or self.best.beaten_by(value)
        if improved:
            self.best = Best(step, self.best_key, value, self.higher_is_better)
        scalars[f"eval/best_{self.best_key}"] = self.best.value
        return scalars, improved

    def keep_best(self, checkpoint: Path) -> Path:
        """Make ``checkpoints/best`` a copy (hard links) of ``checkpoint`` with ``best.json``; replaces the old one."""
        if self.best is None:
            raise RuntimeError("keep_best() needs a run() that found a best value first.")
        root = checkpoint.parent
        tmp, old, best = root / ".best_new", root / ".best_old", root / BEST
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
        record = {**self.best.__dict__, "checkpoint": checkpoint.name, "weights_evaluated": self.weights,
                  "report": str(Path("eval") / f"step_{self.best.step:08d}" / "eval.json")}  # fmt: skip
        (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
        return best


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_best(run_dir: str | Path) -> Best | None:
    """The run's ``checkpoints/best/best.json``, or ``None``."""
    path = Path(run_dir) / "checkpoints" / BEST / BEST_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Best(int(data["step"]), data["key"], float(data["value"]), bool(data["higher_is_better"]))


def _device(components: Any) -> Any:
    return next(components.student.parameters()).device


def _inputs(recipe: Any, kind: str, num_classes: int | None) -> EvalInputs:
    prompts = recipe.eval.prompts or (recipe.data.prompts if recipe.data.source == "prompts" else None)
    return conditioned_inputs(kind, recipe.eval.num_samples, num_classes, prompts)


def periodic_evaluator(
    recipe: Any, components: Components, run_dir: Path, weights: str, resumed: bool
) -> PeriodicEval | None:
    """The trainer's evaluator factory (``fewstep.train.evaluator.EvaluatorFactory``): a ``PeriodicEval`` of the
    run's student at the run's image shape (``run_noise_shape``), or ``None`` without ``eval.every_steps``.

    Args:
        recipe: the run's recipe.
        components: the run's components (the student is evaluated with whatever weights it holds when run).
        run_dir: the run directory (reports go to ``eval/step_XXXXXXXX/``, the best checkpoint to
            ``checkpoints/best/``).
        weights: ``ema`` or ``raw``: what the trainer applies while evaluating (recorded in the reports).
        resumed: whether the run resumed (then a stored ``best.json`` is compared against).

    Raises:
        ValueError: ``eval.every_steps`` is set but no metric fits the teacher (names the fix).
    """
    if recipe.eval.every_steps is None:
        return None
    shape = run_noise_shape(recipe, components.teacher)  # the pipeline's latent, or the data's shape
    return PeriodicEval.build(recipe, components, Path(run_dir), shape, weights, resumed)
