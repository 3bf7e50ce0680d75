"""The speed benchmark: end-to-end sampling time of a few-step student vs its teacher with CFG, per backbone family,
measured side by side in one run, into ``docs/results.md`` (the ``speed`` section) and ``docs/results.json``.

    python scripts/bench/speed.py                   # the tiny models of every family (any CPU, a minute)
    python scripts/bench/speed.py --real            # the recipes' real teachers (needs their weights; a GPU)

For each family one shipped recipe (``unet2d``: ``recipes/bench/fashion_lcm.yaml``; ``sd15``, ``sdxl``, ``sd3``,
``flux``: the first ``recipes/*/<family>_*.yaml``, LCM first) is built with ``fewstep.train.build.build_components``;
its teacher is swapped for ``tiny:<family>`` unless ``--real``. The student is untrained (its weights do not change
its speed); a LoRA student is timed merged, as an exported merged pipeline runs. Both go through the evaluation
harness (``fewstep.eval.harness.evaluate``, no metrics): the teacher at its pipeline's default step count (50 DDIM /
Euler steps for the pixel teacher) with its usual CFG (two network evaluations per step), the student at 1/2/4 steps
with its objective's sampler; time per image is the median over timed batches after a warm-up batch, prompt encoding
and VAE decoding included. ``speedup`` = teacher seconds / student seconds, both from this one run.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import fmt, hardware, merge_records, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "speed"
PIXEL_FAMILY = "unet2d"
PIXEL_RECIPE = ROOT / "recipes" / "bench" / "fashion_lcm.yaml"


def family_recipes(families: list[str] | None) -> dict[str, Path]:
    """``family -> recipe``: the pixel-space benchmark recipe for ``unet2d``; for the latent families the first
    shipped ``recipes/*/<family>_*.yaml``, LCM recipes first (the reference few-step sampler)."""
    from fewstep.config import load_recipe
    from fewstep.testing import FAMILIES

    out = {PIXEL_FAMILY: PIXEL_RECIPE}
    for family in FAMILIES:
        found = sorted((ROOT / "recipes").glob(f"*/{family}_*.yaml"))
        if found:
            out[family] = min(found, key=lambda p: (load_recipe(p).objective.name != "lcm", p.name))
    if families:
        unknown = sorted(set(families) - set(out))
        if unknown:
            raise SystemExit(f"No recipe for famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; have {sorted(out)}.")
        out = {f: out[f] for f in families}
    return out


def default_steps(pipeline: Any, fallback: int = 50) -> int:
    """The pipeline's default ``num_inference_steps`` (the teacher's usual step count)."""
    param = inspect.signature(pipeline.__call__).parameters.get("num_inference_steps")
    return int(param.default) if param is not None and isinstance(param.default, int) else fallback


def build(family: str, recipe: Path, real: bool) -> tuple[Any, Any]:
    """``(recipe config, Components)`` on the tiny model unless ``real``. A LoRA student is timed merged: its
    untrained adapters (B = 0) are removed, which leaves exactly the base network a merged export runs."""
    from fewstep.config import load_recipe
    from fewstep.train.build import build_components

    overrides = [] if family == PIXEL_FAMILY or real else [f"teacher.pretrained=tiny:{family}"]
    cfg = load_recipe(recipe, overrides)
    components = build_components(cfg)
    if components.student.is_lora:
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(components.student.denoiser.backbone)  # every adapter (student, fake score, ...)
    return cfg, components


def measure(family: str, recipe: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One family's records: the teacher and the student rows of one harness run, as ratios."""
    from fewstep.eval.harness import conditioned_inputs, evaluate
    from fewstep.eval.samplers import default_guidance, student_sampler, teacher_conditioning, teacher_sampler

    cfg, components = build(family, recipe, args.real)
    teacher = components.teacher
    for module in (teacher.denoiser, components.student):
        module.to(args.device)
    if teacher.pipeline is not None:
        teacher.pipeline.to(args.device)
    # the pixel teachers' usual sampler is 50-step DDIM / Euler (the quality benchmark's), not DDPMPipeline's 1000
    teacher_steps = 50 if family == PIXEL_FAMILY or teacher.pipeline is None else default_steps(teacher.pipeline)
    w = default_guidance(teacher)
    samplers = [
        teacher_sampler(teacher, [teacher_steps], w, name="teacher", source=cfg.teacher.pretrained),
        student_sampler(components, args.student_steps, name="student", weights="untrained (timing only)"),
    ]
    for sampler in samplers:
        sampler.schedule = None  # timings only: no per-step levels in the report (some samplers need the image shape)
    kind, num_classes = teacher_conditioning(teacher)
    n = args.batch_size
    inputs = conditioned_inputs(kind, n, num_classes)
    report = evaluate(samplers, [], inputs, batch_size=n, timing_repeats=args.repeats, device=args.device,
                      progress=not args.quiet)  # fmt: skip
    t_row = next(r for r in report.rows if r.model == "teacher")
    where, date = hardware(args.device), today()
    records = []
    for row in (r for r in report.rows if r.model == "student"):
        records.append({
            "benchmark": SECTION, "family": family, "size": "real" if args.real or family == PIXEL_FAMILY else "tiny",
            "teacher": cfg.teacher.pretrained, "recipe": str(recipe.relative_to(ROOT)),
            "objective": cfg.objective.name, "guidance_scale": w, "teacher_steps": teacher_steps,
            "teacher_nfe": t_row.nfe_per_image, "teacher_seconds_per_image": round(t_row.seconds_per_image, 6),
            "student_steps": row.num_steps, "student_nfe": row.nfe_per_image,
            "student_seconds_per_image": round(row.seconds_per_image, 6),
            "speedup": round(t_row.seconds_per_image / row.seconds_per_image, 2),
            "batch_size": n, "device": args.device.type, "hardware": where, "date": date,
        })  # fmt: skip
    return records


def record_key(r: dict[str, Any]) -> tuple:
    """Rows with the same key replace each other in ``docs/results.json`` (CPU and GPU rows coexist)."""
    return (r.get("benchmark"), r.get("family"), r.get("size"), r.get("student_steps"), r.get("device"))


def format_section(records: list[dict[str, Any]], command: str) -> str:
    """The ``speed`` section of ``docs/results.md`` from every speed record."""
    lines = [
        "## Speed: student vs teacher, end to end",
        "",
        "Written by `scripts/bench/speed.py` (each run replaces the rows it measures and keeps the others; last run: "
        f"`{command}`). Seconds per image of the whole sampling call (prompt "
        "encoding, every network evaluation, VAE decoding), median over timed batches after a warm-up, teacher and "
        "student measured in the same run; the teacher at its pipeline's default steps with its usual CFG, the "
        "student with its objective's sampler and no CFG. `tiny` rows use fewstep's tiny offline models (fixed "
        "costs such as text encoding weigh more there than at real sizes); `unet2d` is the shipped Fashion-MNIST "
        "teacher at its real size, its usual 50 DDIM steps. w = 1 means no CFG (Flux embeds its "
        "guidance in the network: one evaluation per step).",
        "",
        "| family | size | teacher | teacher steps (NFE) | teacher ms / image | student steps (NFE) "
        "| student ms / image | speedup | measured on |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(records, key=lambda r: (r["size"], r["device"], r["family"], r["student_steps"])):
        lines.append(
            f"| {r['family']} | {r['size']} | `{r['teacher']}` (w={r['guidance_scale']:g}) | {r['teacher_steps']} "
            f"({fmt(r['teacher_nfe'], 'g')}) | {r['teacher_seconds_per_image'] * 1000:.1f} | {r['student_steps']} "
            f"({fmt(r['student_nfe'], 'g')}) | {r['student_seconds_per_image'] * 1000:.1f} | **{r['speedup']:.1f}×** "
            f"| {r['hardware']}, {r['date']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=lambda s: [f.strip() for f in s.split(",") if f.strip()], default=None)
    parser.add_argument("--real", action="store_true", help="the recipes' real teachers instead of tiny:<family>")
    parser.add_argument("--student-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=4, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per row (median)")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for family, recipe in family_recipes(args.families).items():
        print(f"[speed] {family}: {recipe.relative_to(ROOT)}", flush=True)
        records += measure(family, recipe, args)
    everything = merge_records(args.results_json, records, record_key)
    command = "python scripts/bench/speed.py" + ("" if not argv else " " + shlex.join(argv))
    section = format_section([r for r in everything if r.get("benchmark") == SECTION], command)
    write_section(args.results_md, SECTION, section)
    print(section)
    print(f"[speed] wrote {args.results_md} and {args.results_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
