"""``fewstep quickstart [--recipe quickstart/digits_lcm] [key=value ...]``: distill the shipped digits teacher and
print the quality table (docs/quickstart.md). The workflow is ``fewstep.eval.quickstart.quickstart``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fewstep.eval.quickstart import DEFAULT_RECIPE, STUDENT_STEPS, TEACHER_STEPS  # no torch at import


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
    from fewstep.eval.quickstart import quickstart, verdict  # lazy: torch and diffusers

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
