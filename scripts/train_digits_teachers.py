"""Train the class-conditional digits teachers that ship with fewstep (``fewstep:digits-vp``, ``fewstep:digits-flow``).

    python scripts/train_digits_teachers.py                  # both, into fewstep/assets/digits_{vp,flow}/
    python scripts/train_digits_teachers.py --variant flow   # one of them

Each teacher is a small class-conditional ``diffusers.UNet2DModel`` on scikit-learn's 8×8 digits (``[-1, 1]``,
``fewstep.data.digits.DigitsDataset`` train split), saved as ``DDPMPipeline(unet, scheduler).save_pretrained(dir)``
with fp16 safetensors (about 2 MB each):

* ``vp``: a ``DDPMScheduler`` config (Stable Diffusion's ``scaled_linear`` betas 0.00085 → 0.012, 1000 steps,
  ``prediction_type="epsilon"``, ``clip_sample=False``); the UNet is fed the integer index. Samplers end on the
  clean level (ᾱ = 1), the semantics of DDIM's ``set_alpha_to_one=True`` that ``DDIMScheduler.from_config`` gives
  this config. (With DDPM's linear 1e-4 → 0.02 betas, ``sqrt(ᾱ_999) ≈ 0.006`` and an ε-model's one-step
  ``x̂0 = (x − σ·ε̂)/α`` amplifies its error ~150×; scaled_linear's ``≈ 0.07`` keeps 1-step students usable.)
* ``flow``: a ``FlowMatchEulerDiscreteScheduler`` config (``shift=1.0``); ``x_s = (1 − s)·x0 + s·ε``, the UNet is
  fed ``1000·s`` and predicts ``u = ε − x0`` (``FlowSchedule(timestep_scale=1000)``, prediction type ``flow``).

Class labels are 0..9; the null class 10 (``num_class_embeds - 1``) replaces the label with probability 0.1 so the
teachers support classifier-free guidance. The loss is the plain denoising objective in the backbone's own output
space, through ``fewstep.models.Denoiser``; the saved weights are an EMA of the trained ones. Seeded and
deterministic on a CPU (one thread by default: about 4–5 minutes per teacher on an idle core).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

import fewstep.models.backbones  # noqa: F401  (registers the "unet2d" adapter)
from fewstep.data.digits import NUM_CLASSES, DigitsDataset
from fewstep.models import Conditioning, Denoiser, Teacher
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.solvers.grids import linspace_grid, trailing_vp_grid
from fewstep.solvers.steps import noise_to

ASSETS = Path(__file__).resolve().parents[1] / "fewstep" / "assets"
NULL_CLASS = NUM_CLASSES  # the extra class embedding used as "no label" (CFG)


def build_unet(width: int, layers_per_block: int) -> UNet2DModel:
    """An 8×8 class-conditional UNet: blocks at 8×8 and 4×4 (self-attention at 4×4), 11 class embeddings."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(width, 2 * width),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_scheduler(variant: str) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    if variant == "vp":
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            clip_sample=False,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def sample_tau(variant: str, schedule: VPSchedule | FlowSchedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """VP: a uniform integer index, as τ on the teacher's grid; flow: s ~ U(0, 1) (rectified flow)."""
    if variant == "vp":
        index = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)
        return schedule.tau_from_model_timestep(index)
    return torch.rand(n, generator=generator)


def diffusion_loss(
    denoiser: Denoiser, variant: str, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Denoising loss in the backbone's output space: ε (VP-ε) or ``u = ε − x0`` (flow)."""
    tau = sample_tau(variant, denoiser.schedule, x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_tau = noise_to(denoiser.schedule, x0, eps, tau)  # x_τ = α(τ)·x0 + σ(τ)·ε
    target = eps if variant == "vp" else eps - x0
    return F.mse_loss(denoiser.raw(x_tau, tau, Conditioning(class_labels=labels)).float(), target)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)


def fit(
    denoiser: Denoiser,
    ema: torch.nn.Module,
    variant: str,
    sample_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    args: argparse.Namespace,
    report: Callable[[int, float, float], object],
    generator: torch.Generator,
) -> float:
    """The loop every shipped teacher trains with: ``args.steps`` AdamW steps (``args.lr``, linear warm-up then cosine
    decay to 0, gradients clipped to 1) on the denoising loss of ``sample_batch()``'s ``(x0, labels)``, each label
    replaced by the null class with probability ``args.label_dropout`` (CFG), and an EMA of the weights
    (``args.ema_decay`` with warm-up). ``report(step, running loss, seconds)`` is called after every step. Returns the
    training seconds."""
    model = denoiser.backbone
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(200, args.steps // 10))

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 0
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    start, running = time.perf_counter(), 0.0
    for step in range(args.steps):
        x0, y = sample_batch()
        drop = torch.rand(args.batch_size, generator=generator) < args.label_dropout  # CFG: null class
        labels = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        loss = diffusion_loss(denoiser, variant, x0, labels, generator)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        report(step + 1, running, time.perf_counter() - start)
    return time.perf_counter() - start


def train(variant: str, args: argparse.Namespace) -> tuple[UNet2DModel, Denoiser]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + (0 if variant == "vp" else 1))
    data = DigitsDataset("train")
    x_all = torch.stack([data[i][0] for i in range(len(data))])  # [n, 1, 8, 8] in [-1, 1]
    y_all = torch.tensor([data[i][1] for i in range(len(data))])

    scheduler = build_scheduler(variant)
    schedule = VPSchedule.from_diffusers(scheduler) if variant == "vp" else FlowSchedule(timestep_scale=1000.0)
    unet = build_unet(args.width, args.layers_per_block).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    denoiser = Denoiser(unet, schedule, "epsilon" if variant == "vp" else "flow", "unet2d")

    def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=generator)
        return x_all[idx], y_all[idx]

    def report(step: int, loss: float, seconds: float) -> None:
        if step % 500 == 0 or step == args.steps:
            print(f"[{variant}] step {step}/{args.steps}  loss {loss:.4f}  {seconds:.0f} s", flush=True)

    fit(denoiser, ema, variant, sample_batch, args, report, generator)
    return ema, Denoiser(ema, schedule, denoiser.prediction_type, "unet2d")


def evaluate(denoiser: Denoiser, variant: str, num_images: int, seed: int) -> dict[str, float]:
    """50-step sampling at guidance w = 1, 2, 3: FID to the train split and class accuracy (digits classifier)."""
    from fewstep.eval.digits import IMAGE_SHAPE, NUM_CLASSES, DigitsMetrics
    from fewstep.eval.harness import balanced_labels, shared_noise

    metrics = DigitsMetrics()
    noise, labels = shared_noise(num_images, IMAGE_SHAPE, seed), balanced_labels(num_images, NUM_CLASSES).labels
    teacher = Teacher(denoiser, null_cond=Conditioning(class_labels=torch.tensor([NULL_CLASS])), family="unet2d")
    taus = trailing_vp_grid(50) if variant == "vp" else linspace_grid(50)
    out = {}
    for w in (1.0, 2.0, 3.0):
        with torch.no_grad():
            x0 = teacher.sample(noise, Conditioning(class_labels=labels), taus, guidance_scale=w)
        images = ((x0 + 1) / 2).clamp(0, 1)
        out[f"w{w:g}_fid"] = round(metrics.fid_to_reference(images), 3)
        out[f"w{w:g}_accuracy"] = round(metrics.accuracy(images, labels), 4)
        print(
            f"[{variant}] 50 steps, w={w:g}: FID {out[f'w{w:g}_fid']:.2f}  accuracy {out[f'w{w:g}_accuracy']:.3f}",
            flush=True,
        )
    return out


def save(
    ema: UNet2DModel, variant: str, args: argparse.Namespace, info: dict, dataset: str = "digits",
    info_file: str = "fewstep_digits.json",
) -> Path:  # fmt: skip
    """``DDPMPipeline(unet, scheduler).save_pretrained`` into ``<out-dir>/<dataset>_<variant>`` (fp16 unless
    ``--no-fp16``) plus the training record ``info_file``."""
    out = args.out_dir / f"{dataset}_{variant}"
    diffusers_logging.set_verbosity_error()  # casting a fresh model to fp16 for saving is intended here
    pipe = DDPMPipeline(unet=ema.to(torch.float16 if args.fp16 else torch.float32), scheduler=build_scheduler(variant))
    pipe.save_pretrained(out, safe_serialization=True)
    (out / info_file).write_text(json.dumps(info, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["vp", "flow", "both"], default="both")
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=1000, help="0 skips the evaluation")
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="save fp32 weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for variant in ("vp", "flow") if args.variant == "both" else (args.variant,):
        start = time.perf_counter()
        ema, denoiser = train(variant, args)
        seconds = time.perf_counter() - start
        info = {
            "variant": variant,
            "prediction_type": denoiser.prediction_type,
            "model_timestep": "integer index n (tau = (n+1)/1000)" if variant == "vp" else "1000 * s",
            "null_class": NULL_CLASS,
            "data": "fewstep.data.digits.DigitsDataset('train'), images in [-1, 1]",
            "train_seconds": round(seconds),
            "command": f"python scripts/train_digits_teachers.py --variant {variant}",
            **{k: v for k, v in vars(args).items() if k not in ("variant", "out_dir", "eval_images")},
        }
        if args.eval_images:
            info["eval_50_steps"] = evaluate(denoiser, variant, args.eval_images, args.seed)
        out = save(ema, variant, args, info)
        print(f"[{variant}] trained in {seconds:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
