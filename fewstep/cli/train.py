"""``fewstep train RECIPE [key=value ...] [--dry-run] [--overwrite]``; also ``accelerate launch -m fewstep train
RECIPE``.

A run stopped by its guard (``fewstep.train.loop.TrainingStopped``: weights went bad, nothing bad was saved) prints
one ``error:`` line and exits with status 1. Ctrl-C (SIGINT) writes a checkpoint of the current step and exits with
status 130; SIGTERM does the same and exits with 0. A run whose newest checkpoint is at ``train.max_steps`` already
says so and exits with 0 before any model loads. Under ``accelerate launch`` the main process alone prints.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from fewstep.cli.validate import OVERRIDES_HELP


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=parents,
        help="distill a student from a recipe",
        description="Train from a recipe (a .yaml path or a shipped name) with optional key=value overrides. "
        "For several GPUs or processes: accelerate launch -m fewstep train RECIPE.",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe file or a shipped name (see `fewstep recipes`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe as YAML and exit")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="with train.resume=never, move an earlier run in output_dir aside to <output_dir>.old-<time> instead of "
        "refusing (same as train.overwrite=true; nothing is deleted)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.config.checks import input_issues  # lazy: the parser alone needs no pydantic
    from fewstep.config.errors import RecipeError
    from fewstep.config.load import dump_recipe, load_recipe, resolve_recipe

    overrides = [*args.overrides, *(["train.overwrite=true"] if args.overwrite else [])]
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    # a missing teacher or data path fails here, before anything loads; the hint repeats the command's recipe words
    issues = input_issues(recipe, shlex.join([args.recipe, *args.overrides]))
    if issues:
        raise RecipeError(issues, source=str(resolve_recipe(args.recipe)))
    from fewstep.cli.main import print_once

    done = finished_step(recipe)
    if done is not None:
        print_once(
            f"{recipe.output_dir} is already complete at step {done} (train.max_steps={recipe.train.max_steps}): "
            "nothing to train. Raise train.max_steps to train further, or start over with --overwrite "
            "train.resume=never."
        )
        return 0
    # lazy: torch, diffusers and accelerate load only when training
    from fewstep.eval.periodic import periodic_evaluator
    from fewstep.train.loop import train

    run_dir = train(recipe, evaluator=periodic_evaluator)  # TrainingStopped: one error line, status 1 (cli.main)
    print_once(f"run directory: {run_dir}")
    return 0


def finished_step(recipe: Any) -> int | None:
    """The step of the run's newest checkpoint when ``train.resume: auto`` would resume at ``train.max_steps`` or
    beyond (nothing left to train); ``None`` otherwise, and when that checkpoint cannot be read (the resume then
    verifies it and reports what is wrong)."""
    if recipe.train.resume != "auto" or recipe.train.overwrite:
        return None
    from fewstep.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(recipe.output_dir)
    if newest is None:
        return None
    try:
        step = int(json.loads((newest / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if step >= recipe.train.max_steps else None
