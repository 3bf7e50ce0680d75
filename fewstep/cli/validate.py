"""``fewstep validate RECIPE [key=value ...] [--accelerate-config FILE]``: "valid", or every error with its key path
(exit status 2): the schema, the checks across blocks, the files and directories the recipe names on this machine, and
a video recipe's frame count and resolution against its teacher's configs (``fewstep.config.checks``). With
``--accelerate-config`` also the accelerate launch config the recipe will run under (``fewstep.config.launch``);
``fewstep validate FILE`` checks an accelerate config alone."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewstep.config.errors import RecipeIssue

OVERRIDES_HELP = "overrides such as train.max_steps=2 or teacher.pretrained=tiny:sd15 (values are YAML)"


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        parents=parents,
        help="check a recipe and report every error at once",
        description="Validate a recipe (a .yaml path or a shipped name) with optional key=value overrides, and the "
        "accelerate config it will be launched with. Given an accelerate config alone, check that.",
    )
    parser.add_argument(
        "recipe",
        metavar="RECIPE",
        help="a recipe file or a shipped name (see `fewstep recipes`), or an accelerate config",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="also check the accelerate config for `accelerate launch --config_file FILE` against fewstep and this "
        "recipe: a path, or a shipped name such as fsdp2_full_shard (recipes/accelerate/)",
    )
    parser.add_argument(
        "--no-files",
        action="store_true",
        help="skip the checks of files and directories on this machine (teacher, data.path, train.resume, output_dir,"
        " the deepspeed package), e.g. for a recipe meant for another machine",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the parser alone needs no pydantic; validating imports the objectives' configs (and with them torch)
    from fewstep.config.checks import input_issues
    from fewstep.config.errors import RecipeError
    from fewstep.config.launch import launch_config_issues, resolve_launch_config
    from fewstep.config.load import load_recipe, resolve_recipe
    from fewstep.plan.video_checks import video_issues

    launch_only = _launch_config_alone(args.recipe)
    if launch_only is not None:
        if args.overrides or args.accelerate_config:
            raise RecipeError(
                f"{args.recipe} is an accelerate config, not a recipe: give the recipe first, then "
                f"--accelerate-config {args.recipe}"
            )
        return _report_launch(launch_only, launch_config_issues(launch_only, machine=not args.no_files))
    recipe = load_recipe(args.recipe, args.overrides)
    path = resolve_recipe(args.recipe)
    issues = [] if args.no_files else input_issues(recipe, shlex.join([args.recipe, *args.overrides]))
    notes: list[str] = []
    issues += video_issues(recipe, notes)
    launch = resolve_launch_config(args.accelerate_config) if args.accelerate_config else None
    launch_issues = launch_config_issues(launch, recipe, machine=not args.no_files) if launch else []
    errors = [RecipeError(issues, source=str(path))] if issues else []
    if launch_issues:
        errors.append(RecipeError(launch_issues, source=str(launch), kind="accelerate config"))
    if errors:
        raise errors[0] if len(errors) == 1 else RecipeError("\n".join(str(e) for e in errors))
    print(
        f"valid: {path} (objective {getattr(recipe.objective, 'name', '?')}, "
        f"teacher {recipe.teacher.pretrained}, student {recipe.student.kind}, {recipe.train.max_steps} steps)"
    )
    for note in notes:
        print(f"note: {note}")
    return _report_launch(launch, []) if launch else 0


def _launch_config_alone(name: str) -> Path | None:
    """The accelerate config ``name`` stands for when it is one rather than a recipe, else ``None``."""
    from fewstep.config.errors import RecipeError
    from fewstep.config.launch import is_launch_config, resolve_launch_config
    from fewstep.config.load import read_recipe_file, resolve_recipe

    try:
        path = resolve_recipe(name)
    except RecipeError:
        try:
            return resolve_launch_config(name)  # a shipped config's name: fsdp2_full_shard
        except RecipeError:
            return None  # neither: load_recipe reports the missing recipe
    try:
        return path if is_launch_config(read_recipe_file(path)) else None
    except RecipeError:
        return None  # unreadable: load_recipe reports it


def _report_launch(path: Path, issues: list[RecipeIssue]) -> int:
    from fewstep.config.errors import RecipeError
    from fewstep.config.launch import describe_launch_config

    if issues:
        raise RecipeError(issues, source=str(path), kind="accelerate config")
    print(f"valid: accelerate config {path} ({describe_launch_config(path)})")
    return 0
