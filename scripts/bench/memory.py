"""Peak memory of DMD2 training steps: one frozen base for every role vs naive copies, into
``docs/results.md`` (the ``dmd_memory`` section) and ``docs/results.json``.

    python scripts/bench/memory.py                              # a tiny SDXL-shaped UNet on the CPU (a minute)
    python scripts/bench/memory.py --size sdxl --device cuda    # an SDXL-size UNet (2.6 B, random weights) on a GPU

Layouts, each measured in its own fresh process (so peaks do not mix):

* ``one_lora``: the baseline, one LoRA (rank 64, alpha 8) on the frozen base, one denoising training step;
* ``dmd2_shared_lora``: DMD2 with the student and the fake score as two LoRA adapters on the one frozen base
  (teacher = adapters off), one generator step and one fake-score step;
* ``dmd2_lora_full_fake``: a LoRA student on the base plus a full-weight fake score (a second copy);
* ``dmd2_three_copies``: full student, full fake score and the frozen teacher: three copies (DMD2's own layout).

What is measured: on a GPU ``torch.cuda.max_memory_allocated`` over the steps (after a warm-up step, peak reset);
on a CPU the process's peak resident set size (``ru_maxrss``) minus the resident size before the model was built
(allocator and library noise included: compare rows, not absolute numbers), next to the exact static bytes of
every distinct parameter storage, gradient and AdamW state. The GPU goal: ``dmd2_shared_lora`` ≤ 1.4× ``one_lora``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import hardware, merge_records, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "dmd_memory"
LAYOUTS = ("one_lora", "dmd2_shared_lora", "dmd2_lora_full_fake", "dmd2_three_copies")

# SDXL-base UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), random weights
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=8, cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)  # fmt: skip
SIZES = {"tiny": (TINY_UNET, 64, 32, 16), "sdxl": (SDXL_UNET, 2048, 1280, 128)}  # config, ctx dim, pooled, latent


def build(size: str, device: str) -> tuple[Any, Any]:
    """A random-weight SDXL-shaped teacher and one batch of conditioning for it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fewstep.models.conditioning import Conditioning
    from fewstep.models.denoiser import Denoiser
    from fewstep.models.teacher import Teacher
    from fewstep.noise.schedules import VPSchedule

    config, ctx, pooled, _ = SIZES[size]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel(**config).to(device, dtype)
    if device == "cuda":
        unet.enable_gradient_checkpointing()
    schedule = VPSchedule.from_diffusers(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    null = Conditioning(prompt_embeds=torch.zeros(1, 77, ctx), pooled_prompt_embeds=torch.zeros(1, pooled),
                        time_ids=torch.zeros(1, 6))  # fmt: skip
    teacher = Teacher(Denoiser(unet, schedule, "epsilon", "unet2d_condition"), 1.0, None, null, "sdxl")
    return teacher, null.to(device)


def static_bytes(modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Exact bytes of distinct parameter storages, their gradients, and optimizer state."""
    params: dict[int, torch.Tensor] = {}
    for m in modules:
        for p in m.parameters():
            params[p.data_ptr()] = p
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    state = sum(
        t.numel() * t.element_size() for o in optimizers for s in o.state.values() for t in s.values()
        if torch.is_tensor(t)
    )  # fmt: skip
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "num_params": sum(p.numel() for p in params.values()),
        "grad_bytes": grads,
        "optim_bytes": state,
    }


def worker(layout: str, size: str, device: str, batch_size: int, rank: int) -> dict[str, Any]:
    """Build one layout, run its steps, return its memory numbers (runs in a fresh process)."""
    from fewstep.models.student import Student
    from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
    from fewstep.objectives.protocol import Batch

    torch.manual_seed(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    teacher, null = build(size, device)
    latent = SIZES[size][3]
    cond = null.repeat(batch_size)
    batch = Batch(cond=cond, uncond=cond, x0=torch.randn(batch_size, 4, latent, latent, device=device))
    student = Student.full(teacher) if layout == "dmd2_three_copies" else Student.lora(teacher, rank=rank, alpha=8)
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    groups: dict[str, torch.nn.Module]
    if layout == "one_lora":
        groups, objective = {"student": student}, None
    else:
        fake = "lora" if layout == "dmd2_shared_lora" else "full"
        config = DMD2Config(fake_score=fake, real_guidance_scale=8.0, health_reference_steps=0)
        objective = DMD2(config, teacher, student)
        groups = objective.trainable()
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6) for k, m in groups.items()}
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step(i: int) -> None:
        for phase in ("student",) if objective is None else ("student", "fake_score"):
            with autocast:
                if objective is None:  # plain denoising step on the LoRA (the baseline's training step)
                    tau = torch.rand(batch_size, device=device)
                    eps = torch.randn_like(batch.x0)
                    x_t = (
                        teacher.schedule.alpha(tau).view(-1, 1, 1, 1) * batch.x0
                        + teacher.schedule.sigma(tau).view(-1, 1, 1, 1) * eps
                    )
                    loss = ((student.denoiser.raw(x_t, tau, cond).float() - eps) ** 2).mean()
                else:
                    loss = objective.loss(batch, 0 if phase == "student" else 1, phase).loss
            loss.backward()
            opts[phase].step()
            opts[phase].zero_grad(set_to_none=False)

    step(0)  # warm-up: optimizer state exists from here on
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step(1)
    out = {"layout": layout, **static_bytes([teacher.denoiser, *groups.values()], list(opts.values()))}
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        out["peak_kind"] = "CPU peak RSS increase"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 64 for sdxl, 4 for tiny)")
    parser.add_argument("--layouts", type=lambda s: [v for v in s.split(",") if v], default=list(LAYOUTS))
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def table(rows: list[dict[str, Any]], where: str, size: str, rank: int) -> str:
    base = next((r for r in rows if r["layout"] == "one_lora"), None)

    def static_mib(r: dict[str, Any]) -> float:
        return (r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]) / 2**20

    lines = [
        f"DMD2 step memory, {size} UNet (SDXL-shaped, random weights), LoRA rank {rank}, {where}, {today()}. "
        f"`peak`: {rows[0]['peak_kind']}; "
        "`static`: distinct parameter storages + gradients + AdamW state (exact). Ratios are against `one_lora` (one "
        "LoRA on the base, a plain denoising step). `python scripts/bench/memory.py` (see its docstring).",
        "",
        "| layout | params (M, distinct) | static (MiB) | static / one_lora | peak (MiB) | peak / one_lora |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        static = static_mib(r)
        ratio = r["peak_bytes"] / base["peak_bytes"] if base else float("nan")
        static_ratio = static / static_mib(base) if base else float("nan")
        cells = [r["layout"], f"{r['num_params'] / 1e6:.1f}", f"{static:.1f}", f"{static_ratio:.2f}",
                 f"{r['peak_bytes'] / 2**20:.1f}", f"{ratio:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.rank = args.rank or (64 if args.size == "sdxl" else 4)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.device, args.batch_size, args.rank)))
        return
    rows = []
    for layout in args.layouts:
        cmd = [sys.executable, __file__, "--worker", layout, "--size", args.size, "--device", args.device,
               "--batch-size", str(args.batch_size), "--rank", str(args.rank)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{layout} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    where = hardware(args.device)
    section = table(rows, where, args.size, args.rank)
    print(section)
    records = [{"bench": SECTION, "size": args.size, "device": where, "date": today(), **r} for r in rows]
    merge_records(
        args.results_json, records, lambda r: (r.get("bench"), r.get("size"), r.get("device"), r.get("layout"))
    )
    body = args.results_md.read_text() if args.results_md.is_file() else ""
    marker = f"<!-- {SECTION}:start -->"
    previous = body.split(marker, 1)[1].split(f"<!-- {SECTION}:end -->", 1)[0] if marker in body else ""
    others = [b for b in previous.strip().split("\n\n\n") if b.strip() and f", {args.size} UNet" not in b]
    write_section(args.results_md, SECTION, "\n\n\n".join([*others, section]))


if __name__ == "__main__":
    main()
