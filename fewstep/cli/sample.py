"""``fewstep sample TARGET [--prompt TEXT ...] [--prompts FILE] [--labels 0,1,2|all] [--seeds 0,1|--num-seeds N]
[--steps N] [--guidance W] [--out DIR] ...``

TARGET is a training run directory (``--checkpoint``, ``--weights``), an export directory (sampled by stock diffusers
with its exported scheduler) or a teacher (hub id, pipeline directory, ``tiny:<family>``, ``fewstep:<asset>``). Writes
one PNG (or video) per sample, ``contact_sheet.png`` and ``samples.jsonl`` into ``--out`` (``fewstep.eval.sample``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sample", parents=parents, help="write images of a student, an export or a teacher for prompts / labels",
        description="Sample TARGET (a training run directory, an export directory, or a teacher: hub id, pipeline "
        "directory, tiny:<family>, fewstep:<asset>) for each prompt or class label and seed; write one PNG per sample "
        "(videos: MP4 with PyAV, else WebP/GIF), a labelled contact sheet (rows: prompts or labels, columns: seeds) "
        "and samples.jsonl.",
    )  # fmt: skip
    parser.add_argument("target", metavar="TARGET", help="run directory, export directory or teacher spec")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt of a text model (repeatable)")  # fmt: skip
    parser.add_argument("--prompts", metavar="FILE",
                        help='prompts from a file: .txt one per line, or .jsonl lines {"prompt": ...} or '
                        '{"label": ...}, each with an optional "seed"')  # fmt: skip
    parser.add_argument("--labels", metavar="LIST",
                        help="class labels of a class-conditional model: 0,1,2 or all (default: all)")  # fmt: skip
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", metavar="LIST", help="comma-separated seeds (default 0)")
    seeds.add_argument("--num-seeds", type=int, metavar="N", help="seeds 0..N-1")
    parser.add_argument("--steps", metavar="LIST",
                        help="step counts, e.g. 4 or 1,2,4 (default: the student's recommended steps; "
                        "teachers: 50)")  # fmt: skip
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="CFG w (Imagen convention, 1 = off); default: the student's recommended w, the teacher's "
                        "usual one")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="samples per sampler call (default 8)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: samples/<target>)")
    parser.add_argument("--checkpoint", default="newest",
                        help="run TARGET: newest (default), best, step_N, or a checkpoint directory")  # fmt: skip
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="run TARGET: EMA weights when the run kept them (auto), or force ema / raw")  # fmt: skip
    parser.add_argument("--base", help="export TARGET: the base pipeline of a LoRA (default: from its README.md)")
    parser.add_argument("--video-format", choices=("mp4", "webp", "gif"), default=None,
                        help="video outputs: mp4 (needs PyAV: pip install 'fewstep[video]'), webp or gif (default: "
                        "mp4 when PyAV is installed, else webp)")  # fmt: skip
    parser.add_argument("--fps", type=int, default=8, help="frames per second of video outputs (default 8)")
    parser.add_argument("--no-sheet", action="store_true", help="do not write contact_sheet.png")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.set_defaults(run=run)


def integers(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a ``ValueError`` naming ``option`` otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option} expects comma-separated integers such as 0,1,2; got {text!r}.")
    return values


def default_out(target: str) -> Path:
    """``samples/<target as a file name>`` in the working directory."""
    from fewstep.eval.report import slug

    return Path("samples") / slug(target)


def run(args: argparse.Namespace) -> int:
    steps = integers(args.steps, "--steps") if args.steps is not None else None
    if args.num_seeds is not None and args.num_seeds < 1:
        raise ValueError(f"--num-seeds must be >= 1; got {args.num_seeds}.")
    seeds = integers(args.seeds, "--seeds") if args.seeds is not None else list(range(args.num_seeds or 1))
    labels = None
    if args.labels is not None:
        labels = "all" if args.labels.strip().lower() == "all" else integers(args.labels, "--labels")
    from fewstep.eval.sample import RECORDS_FILE, read_prompt_file, sample  # lazy: torch and diffusers

    inputs = read_prompt_file(args.prompts) if args.prompts is not None else []
    out = Path(args.out) if args.out else default_out(args.target)
    result = sample(
        args.target, out, prompts=args.prompt, labels=labels, inputs=inputs, seeds=seeds, steps=steps,
        guidance_scale=args.guidance, batch_size=args.batch_size, checkpoint=args.checkpoint, weights=args.weights,
        base=args.base, device=args.device, video_format=args.video_format, fps=args.fps,
        contact_sheet=not args.no_sheet,
    )  # fmt: skip
    print(f"wrote {len(result.records)} samples to {result.out_dir}")
    if result.contact_sheet is not None:
        print(f"contact sheet: {result.contact_sheet}")
    print(f"records: {result.out_dir / RECORDS_FILE}")
    return 0
