"""``fewstep data RECIPE [key=value ...] [--num-images N] [--prompts FILE] [...]``: write the starter data a recipe's
``data.path`` names, for a first run without data of your own.

* ``data.source: prompts``: a prompt file, one prompt a line (``--prompts FILE``'s, or a small built-in set).
* ``data.source: image_folder``: ``--num-images`` images drawn from the recipe's own teacher (the stock diffusers
  pipeline at its default steps and guidance), with their prompts as captions in ``metadata.jsonl``
  (``fewstep.data.teacher_images``); an interrupted run continues where it stopped.
* ``--to-shards DIR [--shard-size N]``: the recipe's image folder (drawn first if it has no ``metadata.jsonl``) as
  WebDataset shards for ``data.source: webdataset`` (``fewstep.data.shards.write_shards``).

Nothing that exists is overwritten. One process draws the images (not under ``accelerate launch``). Reflow pairs have
their own verb (``fewstep pairs``); the digits and Fashion-MNIST sources need nothing written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fewstep.cli.validate import OVERRIDES_HELP


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "data",
        parents=parents,
        help="write a recipe's starter data (prompts, or images drawn from its teacher)",
        description="Write what the recipe's data.path should hold: for data.source: prompts a prompt file, for "
        "data.source: image_folder images drawn from the recipe's teacher with their prompts as captions. Pass the "
        "same key=value overrides as to `fewstep train`.",
    )
    p.add_argument("recipe", metavar="RECIPE", help="a recipe file or a shipped name (see `fewstep recipes`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="prompts, one a line (default: a small built-in set of varied prompts)")  # fmt: skip
    p.add_argument("--num-images", type=int, default=64, help="image_folder: images to draw (default 64)")
    p.add_argument("--steps", type=int, default=None, help="image_folder: pipeline steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="image_folder: the pipeline's guidance_scale (default: the pipeline's own)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="image_folder: images per pipeline call (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--to-shards",
        type=Path,
        default=None,
        metavar="DIR",
        help="image_folder: also write the folder as WebDataset shards in DIR (data.source: webdataset)",
    )
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="--to-shards: samples a shard (1000)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.cli.main import print_once
    from fewstep.config.load import load_recipe
    from fewstep.data.prompts import STARTER_PROMPTS, PromptDataset, write_prompt_file

    recipe = load_recipe(args.recipe, args.overrides)
    data = recipe.data
    if args.prompts is not None and not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts {str(args.prompts)!r}: no such file (give a text file, one prompt a line).")
    prompts = PromptDataset(path=args.prompts).prompts if args.prompts is not None else list(STARTER_PROMPTS)
    if args.to_shards is not None and data.source != "image_folder":
        raise ValueError(f"--to-shards writes an image folder as shards; the recipe's data.source is {data.source}.")
    if data.source == "prompts":
        if data.path is None:
            print_once("data.prompts lists the prompts inline: nothing to write.")
            return 0
        if Path(data.path).expanduser().exists():
            print_once(f"{data.path} exists already: nothing written.")
            return 0
        print_once(f"wrote {len(prompts)} prompts to {write_prompt_file(data.path, prompts)}")
        return 0
    if data.source in ("digits", "fashion_mnist"):
        print_once(_READ_FROM[data.source])
        return 0
    if data.source != "image_folder":
        raise ValueError(_cannot_write(data.source, args.recipe))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would draw the same images into one folder
        raise ValueError("fewstep data runs in one process: start it without accelerate launch or torchrun.")
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num-images and --batch-size must be >= 1; got {args.num_images} and {args.batch_size}.")
    if args.to_shards is not None and (Path(data.path).expanduser() / "metadata.jsonl").is_file():
        return _write_shards(data, args)
    out = _draw_images(recipe, prompts, args)
    listed = sum(1 for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    print_once(f"image folder: {out} ({listed} images, captions in metadata.jsonl)")
    return _write_shards(data, args) if args.to_shards is not None else 0


def _write_shards(data: Any, args: argparse.Namespace) -> int:
    from fewstep.cli.main import print_once
    from fewstep.data.shards import write_shards

    shards = write_shards(data.path, args.to_shards, args.shard_size, data.caption_column)
    print_once(f"shards: {len(shards)} in {args.to_shards} (data.source: webdataset, data.path: {args.to_shards})")
    return 0


def _draw_images(recipe: object, prompts: list[str], args: argparse.Namespace) -> Path:
    import torch

    from fewstep.data.reflow.generate import TEXT_FAMILIES
    from fewstep.data.teacher_images import check_not_foreign, write_teacher_images
    from fewstep.models.families import detect_family
    from fewstep.models.loading import load_pipeline

    teacher, data = recipe.teacher, recipe.data
    check_not_foreign(data.path)  # before the teacher loads
    pipe = load_pipeline(teacher.pretrained, teacher.dtype, teacher.revision, teacher.variant)
    family = detect_family(pipe)
    if family not in TEXT_FAMILIES:
        raise ValueError(
            f"fewstep data draws images from text-to-image teachers ({', '.join(TEXT_FAMILIES)}); "
            f"{teacher.pretrained!r} is a {family} pipeline. Give data.path a folder of your own images."
        )
    pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return write_teacher_images(
        pipe, data.path, prompts, args.num_images, resolution=data.resolution, num_steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size, caption_column=data.caption_column,
        teacher=teacher.pretrained,
    )  # fmt: skip


_READ_FROM = {
    "digits": "data.source: digits is scikit-learn's handwritten digits, installed with fewstep: nothing to write.",
    "fashion_mnist": "data.source: fashion_mnist reads the Fashion-MNIST idx files (data.path, $FEWSTEP_FASHION_MNIST "
    "or /usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`): nothing to write.",
}


def _cannot_write(source: str, recipe: str) -> str:
    if source == "cache":
        return (
            f"data.source: cache is written by `fewstep cache` from image_folder or prompts data (e.g. `fewstep cache "
            f"{recipe} data.source=image_folder data.path=FOLDER --out DIR`), not by fewstep data."
        )
    if source == "pairs":
        return (
            f"data.source: pairs is written by `fewstep pairs {recipe} --num-pairs N --prompts FILE` (the teacher's "
            "ODE solutions), not by fewstep data."
        )
    return f"data.source: {source} is your own data (a safetensors file of x0): fewstep data cannot write it."
