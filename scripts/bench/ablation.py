"""Ablations: one benchmark recipe trained in several variants side by side, each student evaluated with the quality
benchmark's metrics, one table per study in the document the study names (``docs/dmd.md``, ``docs/consistency.md``)
and one record per variant and step count in ``docs/results.json`` (``"benchmark": "ablation"``).

    python scripts/bench/ablation.py scripts/bench/ablations/digits_dmd2.yaml      # train what is missing, evaluate
    python scripts/bench/ablation.py STUDY --variants a,b --train-only --threads 1 &   # train in parallel
    python scripts/bench/ablation.py STUDY --eval-only                             # evaluate the finished runs

A study file (YAML) names the base recipe, the overrides every variant shares, and the variants, each a list of
recipe overrides and a one-line note::

    title: DMD2, digits, 1 step
    recipe: bench/digits_dmd2
    doc: docs/dmd.md
    set: [train.max_steps=3600]
    variants:
      - name: baseline
        note: the shipped recipe at a longer budget
      - name: fake_lr
        set: [optim.group_lr.fake_score=1e-4]
        note: the fake score learns 5x faster than the generator

Runs go to ``runs/ablations/<study>/<variant>`` and are reused once they reached ``train.max_steps`` (an interrupted run
resumes). Every row uses the same seeded noise and balanced labels (the quality benchmark's ``--seed``), so the rows of
one study differ only by their training.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import BenchRecipe, dataset_metrics, finished, teacher_diversity, train_or_reuse  # noqa: E402
from results_io import fmt, hardware, merge_records, read_records, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = "ablation"


class Variant(BaseModel):
    """One variant: its name (a run directory), the overrides that make it, and what it tests."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    set: list[str] = Field(default_factory=list)
    note: str = ""


class Study(BaseModel):
    """A study file: the base recipe, shared overrides, the variants and where the table goes."""

    model_config = ConfigDict(extra="forbid")

    title: str
    recipe: str
    doc: str
    description: str = ""
    set: list[str] = Field(default_factory=list)
    steps: list[int] = Field(default_factory=lambda: [1])
    num_images: int = Field(1000, ge=2)
    variants: list[Variant]


def load_study(path: Path) -> Study:
    import yaml

    study = Study.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    names = [v.name for v in study.variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: variant names must be unique; got {names}.")
    return study


def variant_recipe(study: Study, name: str, variant: Variant, runs_dir: Path) -> BenchRecipe:
    """The variant's validated recipe, its run in ``runs_dir/<study>/<variant>``."""
    from fewstep.config import load_recipe
    from fewstep.config.load import resolve_recipe
    from fewstep.eval.classifier import BENCHMARK_DATASETS

    path = resolve_recipe(study.recipe)
    overrides = [*study.set, *variant.set, f"output_dir={runs_dir / name / variant.name}"]
    cfg = load_recipe(path, overrides)
    if cfg.data.source not in BENCHMARK_DATASETS:
        raise SystemExit(f"{path}: data.source {cfg.data.source!r} is not a benchmark data set ({BENCHMARK_DATASETS}).")
    return BenchRecipe(path, cfg.data.source, cfg.objective.name, cfg)


def evaluate_variant(bench: BenchRecipe, metrics: list[Any], study: Study, args: argparse.Namespace) -> list[Any]:
    """The student's rows at the study's step counts (no teacher rows), through the harness."""
    from fewstep.eval.harness import evaluate
    from fewstep.eval.targets import run_target

    run_dir = Path(bench.cfg.output_dir)
    target = run_target(run_dir, steps=study.steps, teacher_steps=(), device=args.device)
    report = evaluate(
        target.samplers, metrics, target.inputs(study.num_images), seed=args.seed, batch_size=args.eval_batch_size,
        out_dir=run_dir / "ablation_eval", device=args.device, progress=True,
        info={"target": target.info, "benchmark": "scripts/bench/ablation.py"},
    )  # fmt: skip
    return report.rows


def records_for(study_name: str, study: Study, variant: Variant, bench: BenchRecipe, rows: list[Any],
                seconds: float | None, where: str) -> list[dict[str, Any]]:  # fmt: skip
    m = lambda row, k: None if row.metrics.get(k) is None else round(float(row.metrics[k]), 4)  # noqa: E731
    return [
        {"benchmark": BENCHMARK, "study": study_name, "variant": variant.name, "dataset": bench.dataset,
         "teacher": bench.cfg.teacher.pretrained, "objective": bench.objective, "recipe": study.recipe,
         "overrides": [*study.set, *variant.set], "note": variant.note, "student_steps": row.num_steps,
         "fid": m(row, "fid"), "class_accuracy": m(row, "accuracy"), "precision": m(row, "precision"),
         "recall": m(row, "recall"), "diversity": m(row, "diversity"), "num_images": row.num_images,
         "training_steps": bench.cfg.train.max_steps, "training_seconds": seconds, "hardware": where,
         "date": today()}
        for row in rows
    ]  # fmt: skip


def record_key(r: dict[str, Any]) -> tuple:
    return (r.get("benchmark"), r.get("study"), r.get("variant"), r.get("student_steps"))


def format_study(study_name: str, study: Study, records: list[dict[str, Any]], all_records: list[dict[str, Any]],
                 command: str) -> str:  # fmt: skip
    """The study's table: one row per variant (in the study's order) and step count; ΔFID against the first."""
    quality = [r for r in all_records if r.get("benchmark") == "quality" and r.get("dataset") == records[0]["dataset"]]
    base_div = teacher_diversity(quality).get(records[0]["teacher"])
    teacher50 = [r for r in quality if r["kind"] == "teacher" and r["teacher"] == records[0]["teacher"]]
    teacher_best = max(teacher50, key=lambda r: r["steps"]) if teacher50 else None
    order = {v.name: i for i, v in enumerate(study.variants)}
    rows = sorted(
        (r for r in records if r["variant"] in order), key=lambda r: (order[r["variant"]], r["student_steps"])
    )
    first = {r["student_steps"]: r["fid"] for r in rows if r["variant"] == study.variants[0].name}
    head = ["variant", "change", "steps", "FID ↓", "Δ FID", "accuracy ↑", "precision ↑", "recall ↑",
            "diversity / teacher", "trainer steps", "training s"]  # fmt: skip
    lines = [f"### {study.title}", "", study.description.strip(), "", "| " + " | ".join(head) + " |",
             "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]  # fmt: skip
    for r in rows:
        change = " ".join(f"`{o}`" for o in r["overrides"][len(study.set) :]) or "–"
        base = first.get(r["student_steps"])
        delta = r["fid"] - base if base is not None and r["fid"] is not None else None
        ratio = r["diversity"] / base_div if r.get("diversity") and base_div else None
        lines.append("| " + " | ".join([
            f"{r['variant']}" + (f": {r['note']}" if r["note"] else ""), change, fmt(r["student_steps"], "d"),
            fmt(r["fid"], ".2f"), fmt(delta, "+.2f"), fmt(r["class_accuracy"], ".3f"), fmt(r["precision"], ".3f"),
            fmt(r["recall"], ".3f"), fmt(ratio, ".2f"), fmt(r["training_steps"], "d"),
            fmt(r["training_seconds"], ".0f"),
        ]) + " |")  # fmt: skip
    shared = " ".join(f"`{o}`" for o in study.set) or "none"
    where = "; ".join(sorted({f"{r['hardware']} on {r['date']}" for r in rows}))
    note = (f"Base recipe `{study.recipe}`, overrides shared by every variant: {shared}. "
            f"{rows[0]['num_images']} images per row, the quality benchmark's seeded noise and balanced labels; "
            "FID, accuracy, precision, recall and diversity in the data set's classifier feature space as in "
            "[results.md](results.md)")  # fmt: skip
    if teacher_best is not None:
        note += (f"; the teacher at {teacher_best['steps']} steps measures FID {teacher_best['fid']:.2f}, accuracy "
                 f"{teacher_best['class_accuracy']:.3f} there")  # fmt: skip
    note += f". Measured on {where}. Written by `{command}`."
    return "\n".join([*lines, "", note]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a study file, e.g. scripts/bench/ablations/digits_dmd2.yaml")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, evaluate nothing")
    parser.add_argument("--eval-only", action="store_true", help="evaluate finished runs, train nothing")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "ablations")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--doc", type=Path, default=None, help="the document for the table (default: the study's)")
    parser.add_argument("--eval-batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise (the quality benchmark's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.device, args.inception = torch.device(args.device), False
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    study, name = load_study(args.study), args.study.stem
    wanted = None if args.variants is None else {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = (wanted or set()) - {v.name for v in study.variants}
    if unknown:
        raise SystemExit(f"{args.study}: no variant named {', '.join(sorted(unknown))}.")
    chosen = [v for v in study.variants if wanted is None or v.name in wanted]
    benches = {v.name: variant_recipe(study, name, v, args.runs_dir) for v in chosen}
    if args.train_only:
        for v in chosen:
            train_or_reuse(benches[v.name], False, args.device)
        return 0
    records, metrics, where = [], None, hardware(args.device)
    for v in chosen:
        bench = benches[v.name]
        if args.eval_only and not finished(bench):
            print(f"[ablation] {v.name}: not finished, skipped", flush=True)
            continue
        _, seconds, _ = train_or_reuse(bench, False, args.device)
        metrics = metrics or dataset_metrics(bench.dataset, args)
        rows = evaluate_variant(bench, metrics, study, args)
        records += records_for(name, study, v, bench, rows, seconds, where)
        print(f"[ablation] {v.name}: " + ", ".join(f"{r.num_steps} step FID {r.metrics['fid']:.2f}" for r in rows),
              flush=True)  # fmt: skip
    if not records:
        return 0
    everything = merge_records(args.results_json, records, record_key)
    mine = [r for r in everything if r.get("benchmark") == BENCHMARK and r.get("study") == name]
    command = "python scripts/bench/ablation.py " + shlex.join(argv)
    doc = args.doc or ROOT / study.doc
    write_section(doc, f"ablation_{name}", format_study(name, study, mine, read_records(args.results_json), command))
    print(f"[ablation] wrote {doc} (section ablation_{name}) and {args.results_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
