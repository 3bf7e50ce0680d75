"""``fewstep cache RECIPE [key=value ...] [--out DIR] [--shard-size N] [--batch-size N] [--overwrite]``: encode a
recipe's data once (text embeddings with the teacher's text encoders, latents with its VAE) into a cache, so training
runs from it without loading those encoders (``data.source: cache``, ``data.path: DIR``).

* ``data.source: image_folder`` or ``prompts``: the cache goes to ``--out``, by default ``<folder>/.fewstep_cache`` or
  ``<prompt file>.fewstep_cache``.
* ``data.source: cache``: the cache at ``data.path`` is finished or rebuilt from the data its manifest names, with the
  recipe's teacher (what a stale-cache error asks for).

Under ``accelerate launch`` every rank encodes its own shards. A second run keeps the finished shards and writes the
rest; a cache made by other encoders, at another resolution or from other data is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from fewstep.cli.validate import OVERRIDES_HELP


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "cache",
        parents=parents,
        help="precompute text embeddings and VAE latents, to train without the encoders",
        description="Encode the recipe's image_folder or prompts data once with its teacher's text encoders and VAE "
        "into sharded safetensors files. Train from them with data.source=cache data.path=DIR: the teacher then loads "
        "without its text encoders and VAE. Pass the same key=value overrides as to `fewstep train`.",
    )
    p.add_argument("recipe", metavar="RECIPE", help="a recipe file or a shipped name (see `fewstep recipes`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the cache directory (default: <image folder>/.fewstep_cache, <prompt file>.fewstep_cache, "
                   "or data.path for data.source: cache)")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=None, help="items per shard file (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="items per encoder call (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made otherwise instead of refusing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.cli.main import print_once
    from fewstep.config.load import load_recipe
    from fewstep.data.cache_writer import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, build_cache, default_cache_dir

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out if args.out is not None else default_cache_dir(recipe.data)
    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    words = [args.recipe, *args.overrides, "--out", str(out)]
    words += ["--shard-size", str(shard_size)] if shard_size != DEFAULT_SHARD_SIZE else []
    root = build_cache(
        recipe, out, shard_size=shard_size, batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        overwrite=args.overwrite, progress=not args.no_progress, command="fewstep cache " + shlex.join(words),
    )  # fmt: skip
    from fewstep.data.cache import read_manifest

    manifest = read_manifest(root)
    size_mib = sum(p.stat().st_size for p in root.iterdir() if p.is_file()) / 2**20
    train = shlex.join(["fewstep", "train", args.recipe, *args.overrides, "data.source=cache", f"data.path={root}"])
    print_once(
        f"cache: {root} ({manifest['source']['num_items']} items in {len(manifest['shards'])} shards, "
        f"{size_mib:.1f} MiB)\ntrain from it: {train}"
    )
    return 0
