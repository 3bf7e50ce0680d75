"""``fewstep recipes``: list the shipped recipes (or those in ``--dir``) with their descriptions."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "recipes",
        parents=parents,
        help="list the shipped recipes",
        description="List recipes by the name `fewstep train NAME` accepts, with their descriptions.",
    )
    parser.add_argument("--dir", metavar="DIR", help="list the recipes under DIR instead of the shipped ones")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.config.errors import RecipeError
    from fewstep.config.load import RECIPE_SUFFIX, list_recipes, recipe_description, recipes_dir

    root = Path(args.dir) if args.dir else recipes_dir()
    if args.dir and not root.is_dir():
        raise RecipeError(f"recipe directory {str(root)!r} does not exist")
    names = list_recipes(root)
    if not names:
        print(f"no recipes found in {root}")
        return 0
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(root / f'{name}{RECIPE_SUFFIX}')}".rstrip())
    return 0
