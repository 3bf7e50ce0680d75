"""``fewstep export RUN_DIR --out DIR [--checkpoint latest|best|PATH] [--weights auto|ema|raw]``: LoRA / merged
pipeline / kohya keys as the run's recipe asks, from the weights ``fewstep eval`` samples by default (EMA when the run
kept one)."""

from __future__ import annotations

import argparse
from pathlib import Path

RUN_DIR_IS = (
    "fewstep export takes a training run directory (the recipe's output_dir, holding resolved_config.yaml and "
    "checkpoints/)"
)


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        parents=parents,
        help="export a trained student for diffusers",
        description="Export a checkpoint of a training run (its output_dir) into DIR: by default the newest one, with "
        "the EMA weights when the run kept them (train.ema_decay), as `fewstep eval` samples it.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (the recipe's output_dir)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the exported files")
    parser.add_argument("--checkpoint", default="latest", help="latest (default), best, or a checkpoint directory")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA weights when the run kept them (auto, default), or force ema / raw")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.cli.main import what_is
    from fewstep.objectives.spec import SPEC_FILE

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{str(run_dir)!r} {what_is(run_dir)}: {RUN_DIR_IS}.")
    if (run_dir / SPEC_FILE).is_file() and not (run_dir / "resolved_config.yaml").is_file():
        raise ValueError(f"{str(run_dir)!r} is an export ({SPEC_FILE}), not a training run: {RUN_DIR_IS}.")
    from fewstep.export import export_run  # lazy: loads torch and diffusers

    out = export_run(run_dir, Path(args.out), checkpoint=args.checkpoint, weights=args.weights)
    print(f"exported to {out}")
    return 0
