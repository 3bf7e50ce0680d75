"""``fewstep quickstart [--recipe quickstart/digits_lcm] [key=value ...]``: distill the shipped digits teacher and
print the quality table (docs/quickstart.md).

1. trains the recipe with the one trainer (``fewstep.train.loop.train``; an interrupted run resumes),
2. rebuilds teacher, student and objective from the run's newest checkpoint (``build_components`` + the trainable
   weights, EMA weights when the run kept them),
3. samples the teacher at 1/2/4/50 steps (deterministic DDIM for VP, Euler for flow, with the recipe's guidance)
   and the student at 1/2/4 steps (the objective's own sampler) from the same noise and labels,
4. measures FID in the digits classifier's feature space, class accuracy and seconds per 1,000 images
   (``fewstep.eval.digits``), prints the table and writes ``quickstart_table.md``, ``quickstart_table.json`` and
   ``quickstart_samples.png`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DEFAULT_RECIPE = "quickstart/digits_lcm"
TEACHER_STEPS = (1, 2, 4, 50)
STUDENT_STEPS = (1, 2, 4)
TABLE_FILE = "quickstart_table.md"
JSON_FILE = "quickstart_table.json"
GRID_FILE = "quickstart_samples.png"
GRID_IMAGES = 20  # images per grid row: labels 0..9 twice
GRID_SCALE, GRID_GAP = 6, 2  # 8×8 digits drawn as 48×48 tiles, 2 gray pixels apart


@dataclass
class QuickstartResult:
    """What ``quickstart`` produced: the run, its table rows and the files written into the run directory."""

    run_dir: Path
    rows: list[Any]  # fewstep.eval.digits.DigitsRow
    table: str
    table_path: Path
    grid_path: Path
    train_seconds: float
    total_seconds: float


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive step counts such as 1,2,4; got {text!r}")
    return steps


def add_parser(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the ``quickstart`` verb to the ``fewstep`` command line."""
    parser = subparsers.add_parser(
        "quickstart", parents=list(parents), help="distill the digits teacher on a CPU and print the quality table",
        description="Train a digits recipe (default quickstart/digits_lcm), then compare the teacher at 1/2/4/50 "
        "steps with the student at 1/2/4 steps: FID in a digits classifier's feature space, class accuracy and "
        "seconds per 1,000 images. Writes the table and a sample grid into the run directory.",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=200")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"a digits recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--num-images", type=int, default=1000, help="images per table row (default 1000)")
    parser.add_argument("--teacher-steps", type=_steps, default=list(TEACHER_STEPS), help="default 1,2,4,50")
    parser.add_argument("--student-steps", type=_steps, default=list(STUDENT_STEPS), help="default 1,2,4")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise (default 0)")
    parser.add_argument("--eval-only", action="store_true", help="skip training: evaluate the run's newest checkpoint")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = quickstart(
        args.recipe, args.overrides, num_images=args.num_images, teacher_steps=args.teacher_steps,
        student_steps=args.student_steps, seed=args.seed, train=not args.eval_only,
    )  # fmt: skip
    print()
    print(result.table, end="")
    print(f"\n{verdict(result.rows)}")
    print(f"table: {result.table_path}\nsamples: {result.grid_path}")
    print(f"total {result.total_seconds:.0f} s (training {result.train_seconds:.0f} s)")
    return 0


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
    """
    from fewstep.config.load import load_recipe

    start = time.perf_counter()
    cfg = load_recipe(recipe, overrides)
    _check_digits_recipe(cfg)
    run_dir = Path(cfg.output_dir)
    if train:
        from fewstep.train.loop import train as train_recipe

        run_dir = Path(train_recipe(cfg))
    train_seconds = time.perf_counter() - start
    components, checkpoint, ema = load_run(run_dir, cfg)
    rows, previews = _evaluate(components, cfg, num_images, teacher_steps, student_steps, seed, ema)
    notes = _notes(cfg, components, checkpoint, ema is not None, num_images, seed)
    from fewstep.eval.digits import format_table

    table = format_table(rows, notes)
    table_path = run_dir / TABLE_FILE
    table_path.write_text(f"# Quickstart: {cfg.description or recipe}\n\n{table}", encoding="utf-8")
    grid_path = _write_grid(previews, run_dir / GRID_FILE)
    total = time.perf_counter() - start
    (run_dir / JSON_FILE).write_text(json.dumps({
        "recipe": str(recipe), "overrides": list(overrides), "checkpoint": str(checkpoint),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(total, 1),
        "rows": [r.to_dict() for r in rows],
    }, indent=2) + "\n")  # fmt: skip
    return QuickstartResult(run_dir, rows, table, table_path, grid_path, train_seconds, total)


def _check_digits_recipe(cfg: Any) -> None:
    if cfg.data.source != "digits":
        raise ValueError(
            f"fewstep quickstart measures quality on the digits benchmark; recipe data.source is "
            f"{cfg.data.source!r}, expected 'digits'. Use a recipe under recipes/quickstart/ (e.g. {DEFAULT_RECIPE}); "
            "other recipes train with `fewstep train`."
        )


def load_run(run_dir: Path, cfg: Any) -> tuple[Any, Path, Any]:
    """Rebuild ``Components`` from a recipe and load the run's newest checkpoint into them.

    Returns ``(components, checkpoint_dir, ema)``; ``ema`` is an ``EMA`` holding the run's averaged weights (use
    ``with ema.applied():``) when the run kept one (``train.ema_decay``), else ``None``.
    """
    from safetensors.torch import load_file

    from fewstep.export.run import load_trainable
    from fewstep.train.build import build_components
    from fewstep.train.checkpoint import latest_checkpoint, load_trainable_weights
    from fewstep.train.ema import EMA

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No complete checkpoint in {str(run_dir / 'checkpoints')!r}: nothing to evaluate. Run the quickstart "
            "without --eval-only first (it trains the recipe)."
        )
    components = build_components(cfg)
    weights = load_trainable_weights(checkpoint)
    groups = components.objective.trainable()
    for name, module in groups.items():
        if name not in weights:
            raise ValueError(f"Checkpoint {str(checkpoint)!r} has no weights for {name!r} (has {sorted(weights)}).")
        load_trainable(module, weights[name], name)
    ema = None
    if (checkpoint / "ema.safetensors").is_file():
        ema = EMA(groups, decay=cfg.train.ema_decay or 0.0)
        ema.load_state_dict(load_file(checkpoint / "ema.safetensors"))
    return components, checkpoint, ema


def teacher_taus(schedule: Any, num_steps: int) -> Tensor:
    """The teacher's ``num_steps + 1`` sampling levels: diffusers' ``trailing`` DDIM grid for VP (first step at
    index N−1, last onto the clean level), a uniform grid in ``s`` (shifted as the scheduler does) for flow."""
    from fewstep.noise.timesteps import linspace_grid, trailing_vp_grid

    if schedule.kind == "vp":
        return trailing_vp_grid(num_steps, schedule.num_train_timesteps)
    return schedule.shift(linspace_grid(num_steps))


def _samplers(components: Any) -> dict[str, Any]:
    from fewstep.models.conditioning import Conditioning
    from fewstep.models.loading import decode_latents

    teacher, objective = components.teacher, components.objective
    device = next(teacher.denoiser.parameters()).device
    student_sampler = objective.sampler()

    def teacher_fn(noise: Tensor, labels: Tensor, num_steps: int, generator: torch.Generator) -> Tensor:
        taus = teacher_taus(teacher.schedule, num_steps)
        x0 = teacher.sample(noise.to(device), Conditioning(class_labels=labels.to(device)), taus)
        return decode_latents(teacher, x0)

    def student_fn(noise: Tensor, labels: Tensor, num_steps: int, generator: torch.Generator) -> Tensor:
        x0 = student_sampler(noise.to(device), Conditioning(class_labels=labels.to(device)), num_steps, generator)
        return decode_latents(teacher, x0)

    return {teacher_label(components): teacher_fn, student_label(components): student_fn}


def _solver(components: Any) -> str:
    return "DDIM" if components.teacher.schedule.kind == "vp" else "Euler"


def teacher_label(components: Any) -> str:
    return f"teacher ({_solver(components)}, w={components.teacher.guidance_scale:g})"


def student_label(components: Any) -> str:
    return f"student ({type(components.objective).__name__})"


def _evaluate(
    components: Any,
    cfg: Any,
    num_images: int,
    teacher_steps: Sequence[int],
    student_steps: Sequence[int],
    seed: int,
    ema: Any,
) -> tuple[list[Any], list[Tensor]]:
    from contextlib import nullcontext

    from fewstep.eval.digits import DigitsMetrics, digits_report

    samplers = _samplers(components)
    names = list(samplers)
    steps = {names[0]: list(teacher_steps), names[1]: list(student_steps)}
    with ema.applied() if ema is not None else nullcontext():
        rows = digits_report(samplers, steps, DigitsMetrics(), num_images, seed, preview_images=GRID_IMAGES)
    previews = [_real_preview(GRID_IMAGES)] + [r.preview for r in rows if r.preview is not None]
    return rows, previews


def _real_preview(n: int) -> Tensor:
    """Held-out digits in the grid's label order (0..9 cycled): the first row of the sample grid."""
    from fewstep.eval.digits import NUM_CLASSES, digits_images

    images, labels = digits_images("test")
    picks, seen = [], [0] * NUM_CLASSES
    for i in range(n):
        label = i % NUM_CLASSES
        candidates = (labels == label).nonzero().flatten()
        picks.append(images[candidates[seen[label] % len(candidates)]])
        seen[label] += 1
    return torch.stack(picks)


def _write_grid(rows: list[Tensor], path: Path) -> Path:
    """One row of tiles per entry of ``rows`` (``[n, 1, 8, 8]`` in ``[0, 1]``), enlarged ``GRID_SCALE``× (nearest),
    separated by ``GRID_GAP`` gray pixels so that neighbouring 8×8 digits stay apart."""
    from PIL import Image

    n, tile = min(r.shape[0] for r in rows), 8 * GRID_SCALE
    canvas = torch.full((len(rows) * (tile + GRID_GAP) + GRID_GAP, n * (tile + GRID_GAP) + GRID_GAP), 0.5)
    for i, row in enumerate(rows):
        for j in range(n):
            image = row[j, 0].float().clamp(0, 1).repeat_interleave(GRID_SCALE, 0).repeat_interleave(GRID_SCALE, 1)
            y, x = GRID_GAP + i * (tile + GRID_GAP), GRID_GAP + j * (tile + GRID_GAP)
            canvas[y : y + tile, x : x + tile] = image
    Image.fromarray((canvas * 255).round().to(torch.uint8).numpy(), "L").save(path)
    return path


def _notes(cfg: Any, components: Any, checkpoint: Path, used_ema: bool, num_images: int, seed: int) -> list[str]:
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
        f"- teacher `{cfg.teacher.pretrained}`: deterministic {_solver(components)} sampler, "
        f"classifier-free guidance w = {cfg.teacher.guidance_scale:g} (Imagen convention, w = 1 is off; "
        "w ≠ 1 costs 2 network evaluations per step).",
        f"- student: `{getattr(objective, 'name', '?')}` sampler, no classifier-free guidance at sampling "
        f"(1 network evaluation per step).{omega} Weights: {checkpoint}{' (EMA)' if used_ema else ''}.",
        f"- s / 1,000 images: sampling wall time on this machine (torch threads: {torch.get_num_threads()}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}).",
        f"- `{GRID_FILE}`: one row of held-out real digits, then one row per model row above, in order "
        f"(the first {GRID_IMAGES} images: labels 0–9 twice).",
    ]


def verdict(rows: Sequence[Any], num_steps: int = 4) -> str:
    """One line comparing the student's and the teacher's FID at ``num_steps`` steps."""
    teacher = next((r for r in rows if r.model.startswith("teacher") and r.num_steps == num_steps), None)
    student = next((r for r in rows if r.model.startswith("student") and r.num_steps == num_steps), None)
    if teacher is None or student is None:
        return f"(no {num_steps}-step rows for both teacher and student)"
    better = "beats" if student.fid < teacher.fid else "does not beat"
    return (
        f"The {num_steps}-step student {better} the {num_steps}-step teacher: FID {student.fid:.2f} vs "
        f"{teacher.fid:.2f}, accuracy {student.accuracy:.3f} vs {teacher.accuracy:.3f}."
    )
