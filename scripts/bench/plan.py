"""``fewstep plan`` checked and shown: predicted vs measured memory on the tiny models, and the predictions for the
real models' shipped configs on 1 and 8 GPUs, into ``docs/results.md`` (the ``plan`` section) and
``docs/results.json``.

    python scripts/bench/plan.py                 # a few minutes on one CPU thread
    python scripts/bench/plan.py --skip-measured # only the real-model predictions (a minute)

Measured (each recipe in a fresh process, single rank, CPU): the trainer's step peak in exact tensor bytes, every
CPU storage alive before a step plus the largest increase during it (``fewstep.plan.measure``), the largest over four
steps after a warm-up step; next to it the process's peak resident size increase (what ``scripts/bench/memory.py``
reports on a CPU), which adds the libraries' and the allocator's own memory. FSDP2: a 2-process gloo
``fully_shard`` of the digits UNet as a full student, each rank's local parameter, gradient and AdamW bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import hardware, merge_records, today, write_section  # noqa: E402

SECTION = "plan"
MIB, GIB = 2**20, 2**30
# name -> (recipe, overrides): tiny runs the plan is checked against
MEASURED = {
    "digits LoRA, diffusion, batch 64": ("quickstart/digits_lcm", ["student.kind=lora", "student.lora={rank: 4}",
                                         "objective={name: diffusion}"]),
    "digits full, LCM (EMA target), batch 64": ("quickstart/digits_lcm", []),
    "tiny SD1.5 LoRA, DMD2, 64 px, batch 4": ("dmd/sd15_dmd2", [
        "teacher.pretrained=tiny:sd15", "teacher.dtype=float32", "train.mixed_precision=no",
        "student={kind: lora, lora: {rank: 4}}", "objective.resolution=64",
        "objective.gan_weight=0", "objective.health_reference_steps=0", "objective.fake_steps_per_generator_step=1",
        "data={source: prompts, prompts: [a cat, a dog], batch_size: 4}"]),
    "digits full, DMD2, batch 64": ("bench/digits_dmd2", ["objective.health_reference_steps=0"]),
    "digits full, sCM (JVP), batch 64": ("bench/digits_flow_scm", []),
    "digits full, rCM, batch 64": ("bench/digits_flow_rcm", ["objective.tangent_warmup_steps=0"]),
    "digits full, PCM, batch 64": ("bench/digits_pcm", []),
    "digits LoRA, phased DMD, batch 64": ("bench/digits_phased_dmd", []),
    "digits AGD, batch 64": ("bench/digits_flow_agd", []),
    "digits full, guidance distillation, batch 64": ("bench/digits_flow_guidance_distill", []),
}  # fmt: skip
COMMON = ["train.sample_every=null", "train.progress=false", "train.checkpoint_every=1000", "eval.every_steps=null",
          "train.ema_decay=null"]  # fmt: skip
# name -> (recipe, overrides): real models from their shipped configs
REAL = {
    "SDXL DMD2 LoRA (1024 px, batch 2)": ("dmd/sdxl_dmd2_lora", []),
    "FLUX.1-dev DMD2 LoRA (1024 px, batch 1)": ("dmd/flux_dmd2_lora", []),
    "SD3.5 Large DMD2 LoRA (1024 px, batch 1)": ("dmd/sd3_dmd2_lora",
                                                ["teacher.pretrained=stabilityai/stable-diffusion-3.5-large"]),
    "FLUX.1-dev full DMD2 (1024 px, batch 1)": ("dmd/flux_dmd2_lora", ["student.kind=full", "student.lora=null",
                                                                      "objective.fake_score=full"]),
    "Wan 2.1 14B DMD2 LoRA (480 px, 81 frames, batch 1)": ("dmd/flux_dmd2_lora", [
        "teacher.pretrained=Wan-AI/Wan2.1-T2V-14B-Diffusers", "objective.resolution=480"]),
    "Qwen-Image DMD2 LoRA (1024 px, batch 1)": ("dmd/flux_dmd2_lora", ["teacher.pretrained=Qwen/Qwen-Image",
                                                                     "objective.resolution=1024"]),
}  # fmt: skip


def worker(name: str, out_dir: str) -> dict[str, Any]:
    """Plan and measure one tiny recipe (in a fresh process)."""
    import torch

    from fewstep.config.load import load_recipe
    from fewstep.plan import layout_by_name, plan_recipe
    from fewstep.plan.measure import LiveTensorBytes, tensor_bytes_alive
    from fewstep.train.build import build_components
    from fewstep.train.loop import Trainer, make_accelerator

    torch.set_num_threads(1)
    recipe_name, overrides = MEASURED[name]
    recipe = load_recipe(recipe_name, [*overrides, *COMMON, f"output_dir={out_dir}"])
    rank = layout_by_name(plan_recipe(recipe, device="cpu"), "ddp")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    trainer.train_step()
    peak = 0
    for _ in range(4):
        before = tensor_bytes_alive()
        with LiveTensorBytes() as live:
            trainer.train_step()
        peak = max(peak, before + live.peak)
    trainer.release_run_dir()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"name": name, "predicted_bytes": rank.total_bytes, "predicted_static_bytes": rank.static_bytes,
            "measured_bytes": peak, "rss_increase_bytes": rss}  # fmt: skip


def measure_all(names: list[str]) -> list[dict[str, Any]]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run([sys.executable, __file__, "--worker", name, "--out", tmp], env=env,
                                    capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            print(f"{name} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def measure_fsdp() -> dict[str, Any] | None:
    """The 2-process gloo ``fully_shard`` run of the test suite's worker, against the plan."""
    from fewstep.config.load import validate_recipe
    from fewstep.plan import layout_by_name, plan_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = validate_recipe({"teacher": {"pretrained": "fewstep:digits-vp"}, "student": {"kind": "full"},
                                  "objective": {"name": "diffusion"}, "data": {"source": "digits"},
                                  "output_dir": str(Path(tmp) / "run")})  # fmt: skip
        rank = layout_by_name(plan_recipe(recipe, world_size=2, device="cpu"), "fsdp2_full_shard")
        worker_file = ROOT / "tests" / "unit" / "plan" / "fsdp_shard_worker.py"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(worker_file), tmp]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"FSDP run failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            return None
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    predicted = rank.persistent["trainable weights"] + rank.step["gradients"] + rank.persistent["AdamW state"]
    return {"predicted_bytes": predicted, "measured_bytes": [r["params"] + r["grads"] + r["optimizer"] for r in ranks]}


def real_rows() -> list[dict[str, Any]]:
    from fewstep.config.load import load_recipe
    from fewstep.plan import layout_by_name, plan_recipe

    rows = []
    for name, (recipe_name, overrides) in REAL.items():
        for gpus in (1, 8):
            plan = plan_recipe(load_recipe(recipe_name, overrides), world_size=gpus)
            best = plan.recommended
            peaks = {}
            for layout in ("ddp", "ddp+ckpt", "fsdp2_full_shard+ckpt", "fsdp2_full_shard+offload+ckpt"):
                try:
                    peaks[layout] = layout_by_name(plan, layout).total_bytes
                except ValueError:
                    peaks[layout] = None
            rows.append({"name": name, "gpus": gpus, "peaks": peaks, "recommended": best.layout.name if best else None,
                         "recommended_bytes": best.total_bytes if best else None})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def render(measured: list[dict[str, Any]], fsdp: dict[str, Any] | None, real: list[dict[str, Any]], where: str) -> str:
    lines = ["### `fewstep plan`: predicted vs measured", "",
             f"{where}, {today()}. Single process, exact tensor bytes (every storage alive before a step plus the "
             "step's largest increase; the CPU analogue of `max_memory_allocated`). `RSS +` is the process's peak "
             "resident size increase over the same run (libraries and allocator included). "
             "`python scripts/bench/plan.py`.", "",
             "| recipe | predicted MiB | measured MiB | error | RSS + MiB |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in measured:
        error = (r["predicted_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
        lines.append(f"| {r['name']} | {r['predicted_bytes'] / MIB:.1f} | {r['measured_bytes'] / MIB:.1f} | "
                     f"{error:+.0%} | {r['rss_increase_bytes'] / MIB:.0f} |")  # fmt: skip
    if fsdp is not None:
        got = ", ".join(f"{b / MIB:.3f}" for b in fsdp["measured_bytes"])
        lines += ["", f"FSDP2 full shard, 2 CPU processes (gloo), digits UNet as a full student: parameters + "
                  f"gradients + AdamW per rank predicted {fsdp['predicted_bytes'] / MIB:.3f} MiB, measured {got} MiB "
                  "(ranks 0, 1)."]  # fmt: skip
    lines += ["", "Real models from the shipped configs (80 GB GPUs, 10% headroom; per-rank peak GiB; bf16 as the "
              "recipes set it):", "",
              "| run | GPUs | ddp | ddp+ckpt | fsdp2 full+ckpt | fsdp2 full+offload+ckpt | recommended |",
              "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in real:
        cells = ["–" if v is None else f"{v / GIB:.1f}" for v in r["peaks"].values()]
        best = "none fits" if r["recommended"] is None else f"{r['recommended']} ({r['recommended_bytes'] / GIB:.1f})"
        lines.append(f"| {r['name']} | {r['gpus']} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-measured", action="store_true", help="only the real-model predictions")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.out)))
        return
    measured = [] if args.skip_measured else measure_all(list(MEASURED))
    fsdp = None if args.skip_measured else measure_fsdp()
    real = real_rows()
    where = hardware("cpu")
    section = render(measured, fsdp, real, where)
    print(section)
    records = [{"benchmark": SECTION, "kind": "measured", "device": where, "date": today(), **r} for r in measured]
    records += [{"benchmark": SECTION, "kind": "real", "date": today(), **r} for r in real]
    key = lambda r: (r.get("benchmark"), r.get("kind"), r.get("name"), r.get("gpus"))  # noqa: E731
    merge_records(args.results_json, records, key)
    write_section(args.results_md, SECTION, section)


if __name__ == "__main__":
    main()
