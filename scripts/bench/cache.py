"""Memory that training from a ``fewstep cache`` saves (the teacher's text encoders and VAE stay on disk), into
``docs/results.md`` (the ``cache`` section) and ``docs/results.json``.

    python scripts/bench/cache.py            # CPU, a few minutes

1. Measured, on the CPU: the tiny zoo teachers (``tiny:sd15``, ``tiny:sdxl``, ``tiny:sd3``, ``tiny:flux``) and one
   SD1.5-shaped pipeline whose text encoder and VAE have their real sizes (the CLIP ViT-L/14 text tower and SD's VAE
   from the shipped SD1.5 configs, random weights) on a tiny UNet. For each: the parameter bytes the teacher holds
   when loaded as for the image folder and as for its cache (exact), and the peak resident set size (``VmHWM``) of a
   process that runs 3 DMD2 LoRA steps from the folder and one that runs them from the cache, each in a fresh
   process, one after the other. No sample grids: a grid loads the VAE for the moment it decodes.
2. Predicted, for real models, from the configs shipped in ``fewstep/assets/configs`` built on the meta device (no
   weights): parameter bytes of the text encoders and the VAE against the backbone's, in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import hardware, merge_records, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "cache"
MIB, GIB = 2**20, 2**30
TINY = ("tiny:sd15", "tiny:sdxl", "tiny:sd3", "tiny:flux")
FULL_ENCODERS = "sd15-size encoders"  # SD1.5's real text encoder and VAE on a tiny UNet (full_encoder_pipeline)
REAL = {
    "SDXL base 1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "SD3.5 Large": "stabilityai/stable-diffusion-3.5-large",
}
STEPS = 3


def full_encoder_pipeline(directory: Path) -> str:
    """An SD1.5 pipeline with the real text encoder and VAE shapes (random weights, seeded) and a tiny UNet of
    cross-attention width 768, saved to ``directory``; its 64 px images are 8×8 latents."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fewstep.models.loading import load_pipeline

    configs = ROOT / "fewstep" / "assets" / "configs" / "runwayml--stable-diffusion-v1-5"
    torch.manual_seed(0)
    pipe = load_pipeline("tiny:sd15")
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")).eval()
    pipe.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")).eval()
    unet = dict(pipe.unet.config)
    unet.update(cross_attention_dim=768, sample_size=8)
    pipe.unet = UNet2DConditionModel.from_config(unet).eval()
    pipe.save_pretrained(directory)
    return str(directory)


def param_bytes(modules: dict[str, Any]) -> dict[str, int]:
    """Parameter bytes of each ``nn.Module`` among a pipeline's components."""
    return {name: sum(p.numel() * p.element_size() for p in m.parameters())
            for name, m in modules.items() if isinstance(m, torch.nn.Module)}  # fmt: skip


def loaded_bytes(spec: str) -> dict[str, Any]:
    """What the teacher holds loaded for the folder and for its cache (exact parameter bytes)."""
    from fewstep.models.loading import load_teacher

    cfg = SimpleNamespace(pretrained=spec, guidance_scale=2.0)
    full = load_teacher(cfg)
    cached = load_teacher(cfg, encoders=False, null_cond=full.null_cond)
    folder, cache = param_bytes(full.pipeline.components), param_bytes(cached.pipeline.components)
    skipped = sorted(set(folder) - set(cache))
    return {"folder_param_bytes": sum(folder.values()), "cache_param_bytes": sum(cache.values()),
            "skipped": {name: folder[name] for name in skipped}}  # fmt: skip


def write_recipe(directory: Path, spec: str, resolution: int) -> Path:
    """A DMD2 LoRA recipe over ``directory/images`` (batch 2), ``STEPS`` steps, no grids, one checkpoint at the end."""
    import yaml

    recipe = {
        "teacher": {"pretrained": spec, "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2"},
        "data": {"source": "image_folder", "path": str(directory / "images"), "resolution": resolution,
                 "batch_size": 2},
        "train": {"max_steps": STEPS, "checkpoint_every": STEPS, "sample_every": None, "progress": False},
        "output_dir": str(directory / "run"),
    }  # fmt: skip
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def worker(recipe: str, mode: str, cache: str) -> dict[str, Any]:
    """``STEPS`` training steps of ``recipe`` from its folder or its cache, in this (fresh) process: peak RSS."""
    torch.set_num_threads(1)
    import diffusers  # noqa: F401  (libraries in the baseline, as in both modes)
    import transformers  # noqa: F401

    from fewstep.config.load import load_recipe
    from fewstep.train.loop import train

    base = memory_status("VmRSS")
    overrides = [f"output_dir={Path(recipe).parent / mode}"]
    if mode == "cache":
        overrides += ["data.source=cache", f"data.path={cache}", "data.resolution=null"]
    train(load_recipe(recipe, overrides))
    peak = memory_status("VmHWM")
    return {"peak_rss_bytes": peak, "rss_increase_bytes": peak - base}


def memory_status(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process in bytes, from ``/proc/self/status``. Not
    ``ru_maxrss``: a child process starts with its parent's peak there (Linux keeps it across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {key} (peak RSS is read on Linux only)")


def measure(spec: str, name: str, resolution: int) -> dict[str, Any]:
    """One row: loaded parameter bytes, then peak RSS of the folder run and the cache run (fresh processes)."""
    from fewstep.config.load import load_recipe
    from fewstep.data.cache_writer import build_cache

    sys.path.insert(0, str(ROOT))
    from tests.helpers import captioned_noise_images

    row = {"name": name, **loaded_bytes(spec)}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "images").mkdir()
        captioned_noise_images(directory / "images", count=4, size=resolution)
        recipe = write_recipe(directory, spec, resolution)
        cache = build_cache(load_recipe(str(recipe)), directory / "cache", progress=False)
        for mode in ("folder", "cache"):
            command = [sys.executable, __file__, "--worker", mode, "--recipe", str(recipe), "--cache", str(cache)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{name} {mode} failed:\n{result.stderr[-3000:]}")
            row[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def real_row(name: str, hub_id: str) -> dict[str, Any]:
    """Parameter bytes (bf16) of a real pipeline's components, from its shipped configs on the meta device."""
    from fewstep.models.loading import encoder_components, pipeline_index
    from fewstep.plan.meta import meta_pipeline, quiet_diffusers
    from fewstep.plan.sources import config_directory

    directory, _ = config_directory(hub_id)
    with quiet_diffusers():
        pipe = meta_pipeline(directory, torch.bfloat16)
    sizes = param_bytes(pipe.components)
    skipped = encoder_components(pipeline_index(str(directory)))
    row = {"name": name, "hub_id": hub_id, "dtype": "bfloat16", "components": sizes, "skipped": skipped,
           "skipped_bytes": sum(sizes.get(n, 0) for n in skipped), "total_bytes": sum(sizes.values())}  # fmt: skip
    print(row, flush=True)
    return row


def render(measured: list[dict[str, Any]], real: list[dict[str, Any]], where: str) -> str:
    lines = [
        "### Training from a cache (`fewstep cache`): memory of the skipped text encoders and VAE", "",
        f"{where}, {today()}. `params` is the exact parameter bytes the teacher holds when loaded for the image folder "
        "and for its cache. `peak RSS` is the peak resident set size of a fresh process that trains 3 DMD2 LoRA steps "
        "(batch 2) from the folder or from the cache (one process each, one after the other, same recipe; no sample "
        "grids). RSS counts only the pages a process touches: the weights are memory-mapped from their safetensors "
        "files, so parts never run on the CPU here (the VAE's decoder without grids, the unused rows of a token "
        "table) stay off it even in the folder run; on a GPU every loaded weight takes memory, as `params` says. "
        "`python scripts/bench/cache.py`.", "",
        "| teacher | params folder MiB | params cache MiB | skipped | peak RSS folder MiB | peak RSS cache MiB | "
        "RSS saved MiB |", "|---|---:|---:|---|---:|---:|---:|",
    ]  # fmt: skip
    for r in measured:
        skipped = ", ".join(f"{n} {b / MIB:.2f}" for n, b in r["skipped"].items())
        folder, cache = r["folder"]["peak_rss_bytes"], r["cache"]["peak_rss_bytes"]
        params = f"{r['folder_param_bytes'] / MIB:.2f} | {r['cache_param_bytes'] / MIB:.2f}"
        rss = f"{folder / MIB:.0f} | {cache / MIB:.0f} | {(folder - cache) / MIB:.0f}"
        lines.append(f"| {r['name']} | {params} | {skipped} | {rss} |")
    lines += ["", "Real models, from the configs that ship with fewstep on the meta device (no weights), parameters in "
              "bf16: what a cache run leaves on disk.", "",
              "| model | text encoders + VAE GiB | of which VAE GiB | backbone GiB | share of the teacher's weights |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in real:
        sizes = r["components"]
        backbone = sizes.get("transformer", sizes.get("unet", 0))
        lines.append(f"| {r['name']} | {r['skipped_bytes'] / GIB:.2f} | {sizes.get('vae', 0) / GIB:.3f} | "
                     f"{backbone / GIB:.2f} | {r['skipped_bytes'] / r['total_bytes']:.0%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.recipe, args.worker, args.cache)))
        return
    torch.set_num_threads(1)
    measured = [measure(spec, spec, 16) for spec in TINY]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            measured.append(measure(full_encoder_pipeline(Path(tmp) / "pipe"), FULL_ENCODERS, 64))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    real = [real_row(name, hub_id) for name, hub_id in REAL.items()]
    where = hardware("cpu")
    section = render(measured, real, where)
    print(section)
    records = [{"benchmark": SECTION, "kind": "measured", "device": where, "date": today(), **r} for r in measured]
    records += [{"benchmark": SECTION, "kind": "real", "date": today(), **r} for r in real]
    key = lambda r: (r.get("benchmark"), r.get("kind"), r.get("name"))  # noqa: E731
    merge_records(args.results_json, records, key)
    write_section(args.results_md, SECTION, section)


if __name__ == "__main__":
    main()
