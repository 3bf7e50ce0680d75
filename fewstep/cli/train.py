"""``fewstep train RECIPE [key=value ...] [--dry-run] [--overwrite]``; also ``accelerate launch -m fewstep train
RECIPE``.

A run stopped by its guard (``fewstep.train.loop.TrainingStopped``: weights went bad, nothing bad was saved) prints
one ``error:`` line and exits with status 1.
"""

from __future__ import annotations

import argparse

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
    issues = input_issues(recipe)  # a missing teacher or data path fails here, before anything loads
    if issues:
        raise RecipeError(issues, source=str(resolve_recipe(args.recipe)))
    # lazy: torch, diffusers and accelerate load only when training
    from fewstep.eval.periodic import periodic_evaluator
    from fewstep.train.loop import train

    run_dir = train(recipe, evaluator=periodic_evaluator)  # TrainingStopped: one error line, status 1 (cli.main)
    print(f"run directory: {run_dir}")
    return 0
