"""``fewstep pairs RECIPE --num-pairs N [...] [key=value ...]``: solve the teacher's ODE and write a reflow recipe's
(noise, sample, condition) pairs to its ``data.path`` (``accelerate launch -m fewstep pairs ...``: every rank writes
its own shards; an interrupted run resumes)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "pairs",
        parents=parents,
        help="write a reflow recipe's teacher pairs",
        description="Solve the teacher ODE from seeded noise and write (noise, sample, condition) shards to the "
        "recipe's data.path (data.source: pairs). Resumable; each rank writes its own shards.",
    )
    p.add_argument("recipe", help="a recipe path or shipped name with data.source: pairs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--num-pairs", type=int, required=True)
    p.add_argument("--steps", type=int, default=25, help="teacher ODE steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="CFG w, Imagen convention (default teacher's)")
    p.add_argument("--prompts", type=Path, default=None, help="text file, one prompt a line (text teachers)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from fewstep.config import load_recipe
    from fewstep.data.reflow.generate import pairs_for_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    prompts = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(
                f"--prompts {str(args.prompts)!r} does not exist; give a text file, one prompt a line"
            )
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    out = pairs_for_recipe(
        recipe, args.num_pairs, args.steps, args.guidance, prompts, args.shard_size, args.batch_size, args.seed,
        accelerator=Accelerator(),
    )  # fmt: skip
    from fewstep.cli.main import print_once

    print_once(out)  # every rank wrote its shards; the directory is named once
    return 0
