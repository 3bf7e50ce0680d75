"""``fewstep validate RECIPE [key=value ...]``: "valid", or every error with its key path (exit status 2): the schema,
the checks across blocks, and the files and directories the recipe names on this machine
(``fewstep.config.checks``)."""

from __future__ import annotations

import argparse
import shlex

OVERRIDES_HELP = "overrides such as train.max_steps=2 or teacher.pretrained=tiny:sd15 (values are YAML)"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        parents=parents,
        help="check a recipe and report every error at once",
        description="Validate a recipe (a .yaml path or a shipped name) with optional key=value overrides.",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe file or a shipped name (see `fewstep recipes`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument(
        "--no-files",
        action="store_true",
        help="skip the checks of files and directories on this machine (teacher, data.path, train.resume, output_dir),"
        " e.g. for a recipe meant for another machine",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the parser alone needs no pydantic; validating imports the objectives' configs (and with them torch)
    from fewstep.config.checks import input_issues
    from fewstep.config.errors import RecipeError
    from fewstep.config.load import load_recipe, resolve_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    issues = [] if args.no_files else input_issues(recipe, shlex.join([args.recipe, *args.overrides]))
    if issues:
        raise RecipeError(issues, source=str(resolve_recipe(args.recipe)))
    print(
        f"valid: {resolve_recipe(args.recipe)} (objective {getattr(recipe.objective, 'name', '?')}, "
        f"teacher {recipe.teacher.pretrained}, student {recipe.student.kind}, {recipe.train.max_steps} steps)"
    )
    return 0
