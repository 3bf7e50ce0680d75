"""Scaling on two CPU processes, measured side by side in one run, into ``docs/results.md`` (the ``scale`` section)
and ``docs/results.json``.

    python scripts/bench/scale.py                                  # CPU, about 5 minutes on 2 cores
    python scripts/bench/scale.py --steps 20 --images 1024 --image-size 256 --resolution 128

1. Layouts. Each tiny run trains ``--warmup`` + ``--steps`` optimizer steps with 2 processes (gloo,
   ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu``, one thread per process) as DDP, as FSDP2 full shard
   (``train.fsdp.enabled=true``) and as FSDP2 shard-grad-op (``train.fsdp.reshard_after_forward=false``), one layout
   after the other: the shipped digits teacher with a full student (diffusion objective), the digits teacher with a
   LoRA DMD2 (student and fake score as adapters on one frozen base, GAN head), and ``tiny:sd15`` with a LoRA student
   (diffusion objective) on a folder of captioned images. Seconds per step: the median, after the warm-up steps, of
   the time of ``Trainer.train_step`` on rank 0 (the interval the trainer's own ``time/step_s`` covers: forwards,
   backward, gradient reduction, clipping, the optimizer step; no checkpointing). Per-rank static bytes: rank 0's
   ``state_bytes_per_rank`` from ``run_summary.json`` (frozen and trainable weights, AdamW state, EMA shadows, its
   local shards when sharded), and each part's ratio to DDP's.
2. Checkpoints. The same runs write a checkpoint after every step (``train.checkpoint_every=1``): unsharded with DDP
   (the main process writes safetensors and ``torch.save`` files), sharded with FSDP2 (every rank writes its shard
   with ``torch.distributed.checkpoint``). Save: the time of ``Trainer.save`` (collective; between barriers).
   Load: what a resume does, ``load_checkpoint`` with verification into the live run (collective; between
   barriers), right after each save. Medians after the warm-up steps (at least one: DMD2's fake score first steps
   on the second step, and a sharded checkpoint written before every optimizer group has stepped does not resume);
   size: the bytes of the newest checkpoint.
3. Data loading, one process: samples/s of ``build_batches`` over one epoch of ``--images`` seeded noise PNGs of
   ``--image-size`` px with captions, read as an image folder and as WebDataset tar shards of the same files
   (``fewstep.data.shards.write_shards``), both at ``--resolution`` through ``tiny:sd15``'s VAE and its text encoder
   (the image folder with an empty latent cache: every image decoded and encoded; then its second epoch, served from
   the latent cache it wrote). Without the VAE: the decoding alone, as each source does it (image folder:
   ``load_image`` per file; shards: ``iter_samples`` + ``decode_sample``). Median over ``--rounds`` rounds, sources
   alternating.

Ratios are the point; absolute CPU times say little about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import fmt, hardware, merge_records, today, write_section  # noqa: E402

from fewstep.testing.images import captioned_noise_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "scale"
MIB = 2**20
PARTS = ("frozen_weights", "trainable_weights", "optimizer", "ema")
LAYOUTS = {  # name -> the recipe's train.fsdp block
    "DDP": None,
    "FSDP2 full shard": {"enabled": True},
    "FSDP2 shard-grad-op": {"enabled": True, "reshard_after_forward": False},
}
DIGITS_FULL = {
    "teacher": {"pretrained": "fewstep:digits-vp"},
    "student": {"kind": "full"},
    "objective": {"name": "diffusion"},
}
DIGITS_LORA_DMD2 = {
    "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
    "student": {"kind": "lora", "lora": {"rank": 4, "alpha": 4}},
    "objective": {
        "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
        "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 0,
    },
}  # fmt: skip
SD15_LORA = {
    "teacher": {"pretrained": "tiny:sd15"},
    "student": {"kind": "lora", "lora": {"rank": 4}},
    "objective": {"name": "diffusion"},
}
RUNS = {
    "digits full, diffusion": DIGITS_FULL,
    "digits LoRA, DMD2": DIGITS_LORA_DMD2,
    "tiny:sd15 LoRA, diffusion": SD15_LORA,
}


# --- the runs -------------------------------------------------------------------------------------------------------


def write_recipe(work: Path, run: str, layout: str, args: argparse.Namespace) -> Path:
    """The recipe of ``run`` in ``layout``: ``--warmup`` + ``--steps`` steps, a checkpoint after each, EMA."""
    roles = RUNS[run]
    if roles is SD15_LORA:
        images = work / "train_images"
        if not images.is_dir():
            captioned_noise_images(images, 4 * args.batch_size, args.resolution)
        data = {"source": "image_folder", "path": str(images), "resolution": args.resolution,
                "batch_size": args.batch_size}  # fmt: skip
    else:
        data = {"source": "digits", "batch_size": args.batch_size}
    name = f"{run}-{layout}".replace(" ", "_").replace(",", "").replace(":", "")
    train = {"max_steps": args.warmup + args.steps, "checkpoint_every": 1, "keep_last": args.warmup + args.steps,
             "sample_every": None, "progress": False, "log_every": 1000, "ema_decay": 0.99}  # fmt: skip
    if LAYOUTS[layout] is not None:
        train["fsdp"] = LAYOUTS[layout]
    recipe = {**roles, "data": data, "train": train, "output_dir": str(work / "runs" / name)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def timed(fn: Callable[[], Any], seconds: list[float], barrier: Callable[[], None] | None = None) -> Callable[[], Any]:
    """``fn`` that appends its wall time to ``seconds`` (between ``barrier`` calls, when given)."""

    def call() -> Any:
        if barrier is not None:
            barrier()
        began = time.perf_counter()
        out = fn()
        if barrier is not None:
            barrier()
        seconds.append(time.perf_counter() - began)
        return out

    return call


def train_worker(recipe_path: str, out: str, warmup: int) -> None:
    """One process of a two-process run (under ``accelerate launch``): trains the recipe, timing each
    ``Trainer.train_step``, each ``Trainer.save`` and, right after each save after the ``warmup`` steps, a verified
    load of that checkpoint (by then every optimizer group has stepped: a sharded checkpoint written before a group's
    first step does not resume)."""
    from fewstep.config import load_recipe
    from fewstep.train.build import build_components
    from fewstep.train.checkpoint import checkpoint_fingerprint, latest_checkpoint, load_checkpoint
    from fewstep.train.loop import Trainer, make_accelerator

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    acc = make_accelerator(recipe)
    trainer = Trainer(recipe, acc, build_components(recipe))
    steps, saves, loads, sizes = [], [], [], []
    fingerprint = checkpoint_fingerprint(trainer.groups, recipe, trainer.teacher)
    save = timed(trainer.save, saves, acc.wait_for_everyone)

    def load() -> None:
        ckpt = latest_checkpoint(trainer.run_dir)
        state = (trainer.modules, trainer.optimizers, trainer.schedulers, trainer.ema, trainer.auxiliary,
                 trainer.auxiliary_ema)  # fmt: skip
        load_checkpoint(ckpt, acc, *state, fingerprint=fingerprint)
        if acc.is_main_process:
            sizes.append(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()))

    def save_and_load() -> Path | None:
        path = save()
        if trainer.step > warmup:
            timed(load, loads, acc.wait_for_everyone)()
        return path

    trainer.train_step = timed(trainer.train_step, steps)  # what fit() calls each step
    trainer.save = save_and_load  # what fit() calls for each checkpoint
    trainer.fit()
    if acc.is_main_process:
        result = {"step_s": steps, "save_s": saves, "load_s": loads, "checkpoint_bytes": sizes}
        Path(out).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GLOO_ABORT = "terminate called without an active exception"  # how gloo's rare abort of a rank reads


def launch(recipe: Path, work: Path, warmup: int) -> dict[str, Any]:
    """``train_worker`` on two CPU processes; its timings and the run's ``state_bytes_per_rank``."""
    out = recipe.with_suffix(".json")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"),
               FEWSTEP_CACHE=str(work / "cache"), PYTHONPATH=path)  # fmt: skip
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, also in a reused --work-dir
    out.unlink(missing_ok=True)
    for attempt in (1, 2):  # now and then a process of a gloo job on a loaded machine aborts: one more try
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
            str(Path(__file__).resolve()), "--worker", "train", "--recipe", str(recipe), "--out", str(out),
            "--warmup", str(warmup),
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode == 0:
            break
        failure = f"{recipe.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if out.is_file() and GLOO_ABORT in result.stderr:
            # the main rank wrote its timings after the last collective, so both ranks finished: the abort came
            # as a process exited, and the measurements stand
            print(f"WARNING: {recipe.name}: a rank aborted on exit after the run finished", file=sys.stderr, flush=True)
            break
        if attempt == 2 or out.is_file():
            raise RuntimeError(failure)
        print(f"WARNING: retrying once. {failure[-600:]}", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return {**json.loads(out.read_text()), "state_bytes_per_rank": summary["state_bytes_per_rank"]}


def median_after(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:] or values)


def layout_rows(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run in every layout: time per step, per-rank static bytes, checkpoint save and load."""
    from fewstep.testing.zoo import tiny_path

    with mock.patch.dict(os.environ, {"FEWSTEP_CACHE": str(work / "cache")}):
        tiny_path("sd15")  # built once here, not by both processes of the first run at once
    rows = []
    for run in args.runs:
        ddp: dict[str, Any] | None = None
        for layout in ["DDP", *args.sharded]:
            measured = launch(write_recipe(work, run, layout, args), work, args.warmup)
            rank0 = measured["state_bytes_per_rank"][0]
            row = {
                "run": run,
                "layout": layout,
                "step_s": median_after(measured["step_s"], args.warmup),
                "save_s": median_after(measured["save_s"], args.warmup),
                "load_s": statistics.median(measured["load_s"]),  # timed after the warm-up only
                "checkpoint_bytes": measured["checkpoint_bytes"][-1],
                "state_bytes_rank0": rank0,
                "state_bytes_per_rank": measured["state_bytes_per_rank"],
                "steps_timed": len(measured["step_s"][args.warmup :]),
            }
            ddp = ddp or row
            row["step_vs_ddp"] = row["step_s"] / ddp["step_s"]
            base = ddp["state_bytes_rank0"]
            row["static_vs_ddp"] = {p: rank0[p] / base[p] for p in PARTS if base[p]}
            row["save_vs_ddp"] = row["save_s"] / ddp["save_s"]
            row["load_vs_ddp"] = row["load_s"] / ddp["load_s"]
            rows.append(row)
            print(f"{run:28s} {layout:20s} {row['step_s'] * 1e3:8.1f} ms/step  static {sum(rank0.values()) / MIB:6.2f} "
                  f"MiB  save {row['save_s']:.3f} s  load {row['load_s']:.3f} s", flush=True)  # fmt: skip
    return rows


# --- data loading ---------------------------------------------------------------------------------------------------


def epoch_rate(stream: Any, batches: int, batch_size: int) -> float:
    """Samples per second over ``batches`` batches of ``stream``."""
    began = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - began)


def decode_rate(fn: Callable[[], int]) -> float:
    began = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - began)


def loader_rows(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Samples/s of an image folder and of WebDataset shards of the same images, with and without the VAE."""
    from types import SimpleNamespace

    from fewstep.config.load import validate_recipe
    from fewstep.data.image_folder import ImageFolderDataset, load_image
    from fewstep.data.loader import build_batches
    from fewstep.data.shards import iter_samples, list_shards, write_shards
    from fewstep.data.webdataset import decode_sample
    from fewstep.models.loading import load_teacher

    torch.set_num_threads(1)
    folder = captioned_noise_images(work / "loader_images", args.images, args.image_size)
    shards_dir = work / "loader_shards"
    write_shards(folder, shards_dir, shard_size=max(1, args.images // 4))
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd15", guidance_scale=1.0))
    batch = args.loader_batch
    batches = args.images // batch

    def data(source: str, path: Path) -> Any:
        recipe = {**SD15_LORA, "data": {"source": source, "path": str(path), "resolution": args.resolution,
                                        "batch_size": batch}, "output_dir": str(work / "unused")}  # fmt: skip
        return validate_recipe(recipe).data

    def folder_decode() -> int:
        for file, _caption in ImageFolderDataset(folder).items:
            load_image(file, args.resolution)
        return args.images

    def shards_decode() -> int:
        count = 0
        for shard in list_shards(str(shards_dir)):
            for raw in iter_samples(shard):
                decode_sample(raw, args.resolution)
                count += 1
        return count

    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        empty_cache = mock.patch.dict(os.environ, {"FEWSTEP_CACHE": str(work / f"loader_cache_{r}")})
        measures = [
            ("image folder", "VAE", lambda: build_batches(data("image_folder", folder), teacher)),
            ("webdataset shards", "VAE", lambda: build_batches(data("webdataset", shards_dir), teacher)),
        ]
        if r % 2:
            measures.reverse()
        for source, vae, build in measures:
            with empty_cache:  # the image folder's latent cache lives there: empty each round
                stream = build()
            rates.setdefault(f"{source}|{vae}", []).append(epoch_rate(stream, batches, batch))
            if source == "image folder":  # the same stream's second epoch: latents from the cache it wrote
                rates.setdefault(f"{source}|cached latents", []).append(epoch_rate(stream, batches, batch))
        for source, fn in (("image folder", folder_decode), ("webdataset shards", shards_decode))[:: 1 - 2 * (r % 2)]:
            rates.setdefault(f"{source}|decode only", []).append(decode_rate(fn))
    rows = []
    for key, values in rates.items():
        source, vae = key.split("|")
        rows.append({"source": source, "mode": vae, "samples_per_s": statistics.median(values), "rounds": len(values)})
    for row in rows:
        base = rates[f"image folder|{'decode only' if row['mode'] == 'decode only' else 'VAE'}"]
        row["vs_folder"] = row["samples_per_s"] / statistics.median(base)
    return rows


# --- report ---------------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """``0.48–0.52``, or one number when they all round alike."""
    low, high = (f"{min(values):.2f}", f"{max(values):.2f}") if values else ("–", "–")
    return low if low == high else f"{low}–{high}"


def render(layouts: list[dict[str, Any]], loaders: list[dict[str, Any]], args: argparse.Namespace, where: str) -> str:
    sharded = [r for r in layouts if r["layout"] != "DDP"]
    static = [sum(r["state_bytes_rank0"].values()) / sum(d["state_bytes_rank0"].values())
              for r in sharded for d in layouts if d["run"] == r["run"] and d["layout"] == "DDP"]  # fmt: skip
    lines = [
        "### Scaling: DDP vs FSDP2, sharded checkpoints, WebDataset shards",
        "",
        f"{where}; 2 processes (gloo, one thread each), batch {args.batch_size} per process; {today()}. Time per step: "
        f"median of {args.steps} steps after {args.warmup} warm-up steps, of `Trainer.train_step` on rank 0. Static: "
        "rank 0's `state_bytes_per_rank` (frozen and trainable weights, AdamW state, EMA; its shards when sharded) "
        "and each part's ratio to DDP's. `python scripts/bench/scale.py`.",
        "",
        f"FSDP2 holds {spread(static)} × DDP's static bytes per rank (each part halves on 2 ranks) and takes "
        f"{spread([r['step_vs_ddp'] for r in sharded])} × its time per step: on CPUs over gloo, the per-block "
        "all-gathers and reduce-scatters of these tiny models cost more than their compute. Ratios are the result; "
        "CPU times say little about GPUs.",
        "",
        "| run | layout | ms / step | × DDP | static MiB / rank | frozen × DDP | trainable × DDP | AdamW × DDP | "
        "EMA × DDP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in layouts:
        ratios = [fmt(r["static_vs_ddp"].get(p), ".2f") for p in PARTS]
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['step_s'] * 1e3:.1f} | {r['step_vs_ddp']:.2f} | "
            f"{sum(r['state_bytes_rank0'].values()) / MIB:.2f} | " + " | ".join(ratios) + " |"
        )
    lines += [
        "",
        "Checkpoints of the same runs, one after every step: DDP writes them unsharded (main process), FSDP2 sharded "
        "(every rank its shard, `torch.distributed.checkpoint`). Save: `Trainer.save`; load: a resume's verified "
        f"`load_checkpoint` into the live run; medians of the checkpoints after the {args.warmup} warm-up steps, "
        "between barriers.",
        "",
        "| run | layout | checkpoint MiB | save s | × DDP | load s | × DDP |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in layouts:
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['checkpoint_bytes'] / MIB:.2f} | {r['save_s']:.3f} | "
            f"{r['save_vs_ddp']:.2f} | {r['load_s']:.3f} | {r['load_vs_ddp']:.2f} |"
        )
    lines += [
        "",
        f"Data loading, one process: {args.images} noise PNGs of {args.image_size} px with captions, batches of "
        f"{args.loader_batch} at {args.resolution} px through `tiny:sd15` (VAE and text encoder); median of "
        f"{args.rounds} rounds. `VAE`: one epoch, every image decoded and encoded (the image folder also writes its "
        "latent cache). `cached latents`: the image folder's second epoch, read from that cache (captions already "
        "encoded). `decode only`: reading and decoding the images, no encoders.",
        "",
        "| source | | samples / s | × image folder |",
        "|---|---|---:|---:|",
    ]
    for r in loaders:
        lines.append(f"| {r['source']} | {r['mode']} | {r['samples_per_s']:.0f} | {r['vs_folder']:.2f} |")
    return "\n".join(lines)


def record_key(r: dict[str, Any]) -> tuple:
    return tuple(r.get(k) for k in ("benchmark", "kind", "run", "layout", "source", "mode"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run after the warm-up (6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per run, at least 1 (2)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per process and step (8)")
    parser.add_argument("--resolution", type=int, default=32, help="px of tiny:sd15 training and loading (32)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (all)")
    sharded = [k for k in LAYOUTS if k != "DDP"]
    parser.add_argument("--sharded", nargs="+", choices=sharded, default=sharded, help="layouts next to DDP (both)")
    parser.add_argument("--images", type=int, default=256, help="images of the data-loading benchmark (256)")
    parser.add_argument("--image-size", type=int, default=64, help="px of those image files (64)")
    parser.add_argument("--loader-batch", type=int, default=16, help="batch of the data-loading benchmark (16)")
    parser.add_argument("--rounds", type=int, default=3, help="data-loading rounds (3)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        train_worker(args.recipe, args.out, args.warmup)
        return
    if min(args.steps, args.batch_size, args.images, args.loader_batch, args.rounds, args.warmup) < 1:
        parser.error("--steps, --warmup, --batch-size, --images, --loader-batch and --rounds must be >= 1")
    if args.images < args.loader_batch:
        parser.error(f"--images {args.images} must be at least --loader-batch {args.loader_batch}")
    torch.set_num_threads(1)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fewstep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        layouts = layout_rows(work, args)
        loaders = loader_rows(work, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    where = hardware("cpu")
    section = render(layouts, loaders, args, where)
    print(section)
    common = {"benchmark": SECTION, "device": where, "date": today()}
    records = [{**common, "kind": "layout", **r} for r in layouts]
    records += [{**common, "kind": "loader", **r} for r in loaders]
    merge_records(args.results_json, records, record_key)
    write_section(args.results_md, SECTION, section)


if __name__ == "__main__":
    main()
