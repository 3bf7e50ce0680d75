"""``fewstep plan RECIPE [--gpus N] [--gpu-memory 80GB] [--json] [key=value ...]``: per-rank GPU memory of a recipe
for every layout (DDP, FSDP2, hybrid; CPU offload; activation checkpointing) and the launch command of the cheapest
one that fits, from the models' configs on the meta device (no weights load, nothing downloads)."""

from __future__ import annotations

import argparse
import json
import re

from fewstep.cli.validate import OVERRIDES_HELP

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(t|g|m)?(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"t": 2**40, "g": 2**30, "m": 2**20, None: 2**30}


def memory_size(text: str) -> int:
    """``80GB``, ``80GiB``, ``141G``, ``81920MiB`` or a plain number of GiB to bytes (GB and GiB both mean 2**30: GPU
    capacities are binary)."""
    found = _SIZE.match(str(text))
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write it like 80GB, 141GiB or 81920MiB")
    unit = found.group(2).lower() if found.group(2) else None
    return int(float(found.group(1)) * _UNITS[unit])


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plan",
        parents=parents,
        help="predict a recipe's GPU memory per rank and the cheapest layout that fits",
        description="Predict the per-rank GPU memory of a recipe (a .yaml path or a shipped name) for DDP, FSDP2 and "
        "hybrid layouts with and without CPU offload and activation checkpointing, from the models' configs on the "
        "meta device: no weights are loaded and nothing is downloaded.",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe file or a shipped name (see `fewstep recipes`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in all (default 1)")
    parser.add_argument("--gpu-memory", type=memory_size, default=memory_size("80GB"), help="memory per GPU (80GB)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine, for hybrid sharding (8)")
    parser.add_argument("--frames", type=int, default=None, help="video frames per sample (data.num_frames, else 81)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens per sample (family maximum)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of each GPU left unplanned for the CUDA context, communication buffers and "
                        "fragmentation (0.1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.config.load import load_recipe  # lazy: the parser alone needs no torch
    from fewstep.plan import plan_recipe, render_text, to_json

    recipe = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(recipe, args.gpus, args.gpu_memory, args.gpus_per_node, frames=args.frames,
                       text_tokens=args.text_tokens, headroom=args.headroom)  # fmt: skip
    if args.json:
        print(json.dumps(to_json(plan, args.recipe, args.overrides), indent=2))
    else:
        print(render_text(plan, args.recipe, args.overrides))
    return 0
