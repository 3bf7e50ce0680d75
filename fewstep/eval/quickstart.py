"""The digits quickstart (``fewstep quickstart``, docs/quickstart.md): distill the shipped digits teacher and measure
the student against it.

1. trains the recipe with the one trainer (``fewstep.train.loop.train``, with periodic evaluation when the recipe
   asks for it; an interrupted run resumes),
2. loads the run's newest checkpoint (``fewstep.train.run.load_run``: EMA weights when the run kept them),
3. samples the teacher at 1/2/4/50 steps (deterministic DDIM for VP, Euler for flow, with the recipe's guidance)
   and the student at 1/2/4 steps (the objective's own sampler) from the same noise and labels, through the
   evaluation harness (``fewstep.eval.harness.evaluate``),
4. measures FID in the digits classifier's feature space, class accuracy and seconds per 1,000 images, and writes
   ``quickstart_table.md`` (``fewstep.eval.report.format_benchmark_table``), ``quickstart_table.json`` and
   ``quickstart_samples.png`` into the run directory.

Importing this module loads neither torch nor diffusers (the command line reads its defaults).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from fewstep.eval.harness import Sampler
    from fewstep.eval.report import Row
    from fewstep.train.run import LoadedRun

DEFAULT_RECIPE = "quickstart/digits_lcm"
TEACHER_STEPS = (1, 2, 4, 50)
STUDENT_STEPS = (1, 2, 4)
TABLE_FILE = "quickstart_table.md"
JSON_FILE = "quickstart_table.json"
GRID_FILE = "quickstart_samples.png"
GRID_IMAGES = 20  # images per grid row: labels 0..9 twice
GRID_SCALE, GRID_GAP = 6, 2  # 8×8 digits drawn as 48×48 tiles, 2 gray pixels apart
BATCH_IMAGES = 1000  # images per sampler call
DATA_ROW = "digits test split (real)"


@dataclass
class QuickstartResult:
    """What ``quickstart`` produced: the run, its table rows and the files written into the run directory."""

    run_dir: Path
    rows: list[Row]
    table: str
    table_path: Path
    grid_path: Path
    train_seconds: float
    total_seconds: float


def quickstart(
    recipe: str | Path = DEFAULT_RECIPE,
    overrides: Sequence[str] = (),
    *,
    num_images: int = 1000,
    teacher_steps: Sequence[int] = TEACHER_STEPS,
    student_steps: Sequence[int] = STUDENT_STEPS,
    seed: int = 0,
    train: bool = True,
) -> QuickstartResult:
    """Train a digits recipe and write its quality table and sample grid into the run directory.

    Args:
        recipe: a recipe path or shipped name (its teacher must be a digits teacher, its data ``digits``).
        overrides: ``dotted.key=value`` recipe overrides.
        num_images: images per table row.
        teacher_steps, student_steps: step counts of the teacher and student rows.
        seed: seed of the shared evaluation noise.
        train: train first (``False``: evaluate the newest checkpoint of the recipe's ``output_dir``).

    Raises:
        ValueError: the recipe is not a digits recipe.
        FileNotFoundError: ``train=False`` and the run has no checkpoint yet.
    """
    from fewstep.config.load import load_recipe
    from fewstep.eval.report import benchmark_record, format_benchmark_table
    from fewstep.train.checkpoint import latest_checkpoint
    from fewstep.train.run import load_run

    start = time.perf_counter()
    cfg = load_recipe(recipe, overrides)
    check_digits_recipe(cfg)
    run_dir = Path(cfg.output_dir)
    if train:
        from fewstep.eval.periodic import periodic_evaluator
        from fewstep.train.loop import train as train_recipe

        run_dir = Path(train_recipe(cfg, evaluator=periodic_evaluator))
    elif latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(
            f"No complete checkpoint in {str(run_dir / 'checkpoints')!r}: nothing to evaluate. Run the quickstart "
            "without --eval-only first (it trains the recipe)."
        )
    train_seconds = time.perf_counter() - start
    run = load_run(run_dir)
    rows = evaluate_run(run, cfg, num_images, teacher_steps, student_steps, seed)
    table = format_benchmark_table(rows, notes(cfg, run, num_images, seed))
    table_path = run_dir / TABLE_FILE
    table_path.write_text(f"# Quickstart: {cfg.description or recipe}\n\n{table}", encoding="utf-8")
    grid_path = write_grid(rows, run_dir / GRID_FILE)
    total = time.perf_counter() - start
    (run_dir / JSON_FILE).write_text(json.dumps({
        "recipe": str(recipe), "overrides": list(overrides), "checkpoint": str(run.checkpoint),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(total, 1),
        "rows": [benchmark_record(r) for r in rows],
    }, indent=2) + "\n")  # fmt: skip
    return QuickstartResult(run_dir, rows, table, table_path, grid_path, train_seconds, total)


def check_digits_recipe(cfg: Any) -> None:
    """The quickstart measures on the digits benchmark: the recipe's data must be ``digits``."""
    if cfg.data.source != "digits":
        raise ValueError(
            f"fewstep quickstart measures quality on the digits benchmark; recipe data.source is "
            f"{cfg.data.source!r}, expected 'digits'. Use a recipe under recipes/quickstart/ (e.g. {DEFAULT_RECIPE}); "
            "other recipes train with `fewstep train`."
        )


def quickstart_samplers(
    run: LoadedRun, guidance_scale: float, teacher_steps: Sequence[int], student_steps: Sequence[int]
) -> list[Sampler]:
    """The teacher (``teacher_taus`` levels, guided with ``guidance_scale``) and the run's student, as harness
    samplers with the quickstart's row labels."""
    from fewstep.eval.samplers import student_sampler, teacher_sampler
    from fewstep.solvers.grids import teacher_taus

    components = run.components
    teacher = components.teacher
    solver = "DDIM (η=0), trailing grid" if teacher.schedule.kind == "vp" else "Euler, uniform shifted grid"
    teacher_row = teacher_sampler(
        teacher, teacher_steps, guidance_scale, name=teacher_label(teacher, guidance_scale),
        source=run.recipe.teacher.pretrained, guidance_source="the recipe's teacher.guidance_scale",
        grid=lambda n: (teacher_taus(teacher.schedule, n), solver),  # the diffusers trailing / uniform grid
    )  # fmt: skip
    student_row = student_sampler(
        components, student_steps, name=student_label(components), weights=run.weights,
        source=f"{run.run_dir} ({run.checkpoint.name})",
    )  # fmt: skip
    return [teacher_row, student_row]


def solver_name(teacher: Any) -> str:
    return "DDIM" if teacher.schedule.kind == "vp" else "Euler"


def teacher_label(teacher: Any, guidance_scale: float) -> str:
    return f"teacher ({solver_name(teacher)}, w={guidance_scale:g})"


def student_label(components: Any) -> str:
    return f"student ({type(components.objective).__name__})"


def evaluate_run(
    run: LoadedRun,
    cfg: Any,
    num_images: int,
    teacher_steps: Sequence[int],
    student_steps: Sequence[int],
    seed: int,
) -> list[Row]:
    """The table's rows: held-out real digits, then the teacher and the student at their step counts, from the same
    noise (``seed``) and labels 0..9 cycled; each row keeps its first ``GRID_IMAGES`` images for the grid."""
    from fewstep.data.digits import NUM_CLASSES, digits_images
    from fewstep.eval.harness import EvalInputs, balanced_labels, data_row, evaluate
    from fewstep.eval.suite import build_metrics

    metrics = build_metrics(["fid", "accuracy"], "digits", "class")
    test_images, test_labels = digits_images("test")
    real = data_row(DATA_ROW, test_images, metrics, EvalInputs(labels=test_labels))
    models = quickstart_samplers(run, cfg.teacher.guidance_scale, teacher_steps, student_steps)
    report = evaluate(
        models, metrics, balanced_labels(num_images, NUM_CLASSES), seed=seed, batch_size=BATCH_IMAGES,
        grid_images=GRID_IMAGES, warmup=False, timing_repeats=1, progress=False,
    )  # fmt: skip
    return [real, *report.rows]


def real_preview(n: int) -> Tensor:
    """Held-out digits in the grid's label order (0..9 cycled): the first row of the sample grid."""
    import torch

    from fewstep.data.digits import NUM_CLASSES, digits_images

    images, labels = digits_images("test")
    picks, seen = [], [0] * NUM_CLASSES
    for i in range(n):
        label = i % NUM_CLASSES
        candidates = (labels == label).nonzero().flatten()
        picks.append(images[candidates[seen[label] % len(candidates)]])
        seen[label] += 1
    return torch.stack(picks)


def write_grid(rows: Sequence[Row], path: Path) -> Path:
    """``quickstart_samples.png``: a row of held-out real digits, then one row per sampled table row, each tile
    enlarged ``GRID_SCALE``× and ``GRID_GAP`` gray pixels apart so that neighbouring 8×8 digits stay apart."""
    from fewstep.data.images import save_sample_grid

    previews = [real_preview(GRID_IMAGES)] + [r.preview for r in rows if r.preview is not None]
    return save_sample_grid(previews, path, scale=GRID_SCALE, gap=GRID_GAP)


def notes(cfg: Any, run: LoadedRun, num_images: int, seed: int) -> list[str]:
    """The lines under the table: how its numbers were made."""
    import torch

    objective = cfg.objective
    omega = ""
    if hasattr(objective, "w_min"):
        omega = (f" It was distilled from the teacher guided with ω ∈ [{objective.w_min:g}, {objective.w_max:g}] "
                 f"(LCM convention, w = 1 + ω).")  # fmt: skip
    return [
        f"- {num_images} images per model row, labels 0–9 cycled, the same noise (seed {seed}) for every row.",
        "- FID: Fréchet distance in the 64-d feature space of the digits classifier (`fewstep:digits-classifier`) "
        "to the digits train split (1,617 images), the data the teacher was trained on. The first row is the "
        "held-out test split for scale (180 unseen real digits; so few images bias FID upwards).",
        "- accuracy: fraction of samples the classifier assigns to their conditioning label.",
        f"- teacher `{cfg.teacher.pretrained}`: deterministic {solver_name(run.components.teacher)} sampler, "
        f"classifier-free guidance w = {cfg.teacher.guidance_scale:g} (Imagen convention, w = 1 is off; "
        "w ≠ 1 costs 2 network evaluations per step).",
        f"- student: `{getattr(objective, 'name', '?')}` sampler, no classifier-free guidance at sampling "
        f"(1 network evaluation per step).{omega} Weights: {run.checkpoint}{' (EMA)' if run.weights == 'ema' else ''}.",
        f"- s / 1,000 images: sampling wall time on this machine (torch threads: {torch.get_num_threads()}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}).",
        f"- `{GRID_FILE}`: one row of held-out real digits, then one row per model row above, in order "
        f"(the first {GRID_IMAGES} images: labels 0–9 twice).",
    ]


def verdict(rows: Sequence[Row], num_steps: int = 4) -> str:
    """One line comparing the student's and the teacher's FID at ``num_steps`` steps."""
    teacher = next((r for r in rows if r.model.startswith("teacher") and r.num_steps == num_steps), None)
    student = next((r for r in rows if r.model.startswith("student") and r.num_steps == num_steps), None)
    if teacher is None or student is None:
        return f"(no {num_steps}-step rows for both teacher and student)"
    (t_fid, t_acc), (s_fid, s_acc) = ((r.metrics["fid"], r.metrics["accuracy"]) for r in (teacher, student))
    better = "beats" if s_fid < t_fid else "does not beat"
    return (
        f"The {num_steps}-step student {better} the {num_steps}-step teacher: FID {s_fid:.2f} vs "
        f"{t_fid:.2f}, accuracy {s_acc:.3f} vs {t_acc:.3f}."
    )
