"""``python -m fewstep.data.reflow pairs <recipe> --num-pairs N [...] [key=value ...]``: write a recipe's reflow
pairs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewstep.data.reflow", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pairs", help="solve the teacher ODE and write (noise, sample, condition) shards to data.path")
    p.add_argument("recipe", help="a recipe path or shipped name with data.source: pairs")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--num-pairs", type=int, required=True)
    p.add_argument("--steps", type=int, default=25, help="teacher ODE steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="CFG w, Imagen convention (default teacher's)")
    p.add_argument("--prompts", type=Path, default=None, help="text file, one prompt a line (text teachers)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from fewstep.config import load_recipe
    from fewstep.data.reflow.generate import pairs_for_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    prompts = None
    if args.prompts is not None:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    out = pairs_for_recipe(
        recipe, args.num_pairs, args.steps, args.guidance, prompts, args.shard_size, args.batch_size, args.seed,
        accelerator=Accelerator(),
    )  # fmt: skip
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
