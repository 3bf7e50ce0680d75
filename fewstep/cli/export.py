"""``fewstep export RUN_DIR --out DIR [--checkpoint latest|best|PATH] [--weights auto|ema|raw] [--push-to-hub REPO_ID
[--private] [--hub-token-env VAR]]``: LoRA / merged pipeline / kohya keys as the run's recipe asks, from the weights
``fewstep eval`` samples by default (EMA when the run kept one), with the run's eval table on the model card when a
report of these weights exists (``fewstep.eval.card``); then, with ``--push-to-hub``, the export uploaded as it is
(``fewstep.export.hub``). ``fewstep export DIR --push-to-hub REPO_ID`` pushes an existing export (one written with
``--push-to-hub REPO_ID`` whose upload failed)."""

from __future__ import annotations

import argparse
from pathlib import Path

RUN_DIR_IS = (
    "fewstep export takes a training run directory (the recipe's output_dir, holding resolved_config.yaml and "
    "checkpoints/), or an export to push with --push-to-hub"
)


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        parents=parents,
        help="export a trained student for diffusers",
        description="Export a checkpoint of a training run (its output_dir) into DIR: by default the newest one, with "
        "the EMA weights when the run kept them (train.ema_decay), as `fewstep eval` samples it. With --push-to-hub "
        "the export is then uploaded to the Hugging Face Hub; RUN_DIR may also be an export written with "
        "--push-to-hub whose upload failed, to push it as it is.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (the recipe's output_dir)")
    parser.add_argument("--out", metavar="DIR", help="where to write the exported files (required for a run)")
    parser.add_argument("--checkpoint", default="latest", help="latest (default), best, or a checkpoint directory")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA weights when the run kept them (auto, default), or force ema / raw")  # fmt: skip
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="upload the export to this Hub model repository (owner/name); the model card loads the "
                        "student from there")  # fmt: skip
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")
    parser.add_argument("--hub-token-env", metavar="VAR",
                        help="the environment variable holding a Hub token with write access (default: HF_TOKEN or "
                        "the token of `hf auth login`)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.cli.main import what_is
    from fewstep.objectives.spec import SPEC_FILE

    target = Path(args.run_dir)
    if not target.is_dir():
        raise FileNotFoundError(f"{str(target)!r} {what_is(target)}: {RUN_DIR_IS}.")
    repo_id = args.push_to_hub
    if repo_id is None and (target / SPEC_FILE).is_file() and not (target / "resolved_config.yaml").is_file():
        raise ValueError(f"{str(target)!r} is an export ({SPEC_FILE}), not a training run: {RUN_DIR_IS}.")
    if repo_id is None and (args.private or args.hub_token_env):
        raise ValueError("--private and --hub-token-env go with --push-to-hub REPO_ID.")
    token = None
    if repo_id is not None:
        from fewstep.export.hub import check_repo_id, hub_token

        check_repo_id(repo_id)
        token = hub_token(args.hub_token_env)  # checked before the export, which can take minutes
    out = _existing_export(target, args) if repo_id is not None else None
    if out is None:
        if args.out is None:
            raise ValueError("--out DIR is required: the directory to write the export into.")
        from fewstep.eval.card import evaluation_section  # lazy: loads torch and diffusers
        from fewstep.export import export_run

        out = export_run(target, Path(args.out), checkpoint=args.checkpoint, weights=args.weights,
                         evaluation=evaluation_section, hub_id=repo_id)  # fmt: skip
        print(f"exported to {out}")
    if repo_id is not None:
        from fewstep.export.hub import push_export

        url = push_export(out, repo_id, private=args.private, token=token)
        print(f"pushed {out} to {url}")
    return 0


def _existing_export(target: Path, args: argparse.Namespace) -> Path | None:
    """``target`` when it is an export (not a run directory) to push as it is; ``None`` for a run directory."""
    from fewstep.export.files import is_export
    from fewstep.train.run import CONFIG_FILE

    if (target / CONFIG_FILE).is_file() or not is_export(target):
        return None
    if args.out is not None and Path(args.out).resolve() != target.resolve():
        raise ValueError(
            f"{target} is an export, not a run directory: `fewstep export {target} --push-to-hub REPO_ID` pushes it as "
            "it is (no --out). To export a run, pass its output_dir."
        )
    return target
