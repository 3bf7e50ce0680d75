"""Train the class-conditional Fashion-MNIST teachers that ship with fewstep (``fewstep:fashion-vp``,
``fewstep:fashion-flow``): the teachers of the quality benchmark (``scripts/bench/quality.py``).

    python scripts/train_fashion_teachers.py                  # both, into fewstep/assets/fashion_{vp,flow}/
    python scripts/train_fashion_teachers.py --variant flow   # one of them

The same recipe as the digits teachers (``scripts/train_digits_teachers.py``, whose scheduler configs, denoising
loss and EMA this script reuses), on Fashion-MNIST's 60,000 train images (``fewstep.data.fashion``, 28×28,
``[-1, 1]``), with a larger class-conditional ``diffusers.UNet2DModel``: blocks at 28×28, 14×14 and 7×7
(channels w, 2w, 4w; self-attention at 7×7), saved as ``DDPMPipeline(unet, scheduler).save_pretrained(dir)`` with
fp16 safetensors (about 1.4 MB each at w = 16):

* ``vp``: ``DDPMScheduler`` (``scaled_linear`` betas 0.00085 → 0.012, 1000 steps, ε-prediction), the UNet is fed the
  integer index.
* ``flow``: ``FlowMatchEulerDiscreteScheduler`` (``shift=1.0``), the UNet is fed ``1000·s`` and predicts
  ``u = ε − x0``.

Labels 0..9 (``fewstep.data.fashion.CLASS_NAMES``); the null class 10 replaces the label with probability 0.1 for
classifier-free guidance. After training, the EMA weights sample ``--eval-images`` images at 50 steps and the
script reports the classifier FID (``fewstep:fashion-classifier`` features, reference = the train split) and the
class accuracy. Seeded, one CPU thread by default (the shipped weights were trained so): 2,000 steps of batch 32,
about 0.5 CPU-seconds per step (15–20 CPU-minutes per teacher; 45 minutes of wall time each on the shared 2-core
machine they were trained on, two teachers at once).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits_teachers import NULL_CLASS, build_scheduler, fit, save  # noqa: E402

import fewstep.models.backbones  # noqa: E402, F401  (registers the "unet2d" adapter)
from fewstep.data.fashion import NUM_CLASSES, FashionMNISTDataset  # noqa: E402
from fewstep.models import Conditioning, Denoiser, Teacher  # noqa: E402
from fewstep.noise.schedules import FlowSchedule, VPSchedule  # noqa: E402
from fewstep.solvers.grids import linspace_grid, trailing_vp_grid  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "fewstep" / "assets"


def build_unet(width: int, layers_per_block: int) -> UNet2DModel:
    """A 28×28 class-conditional UNet: blocks at 28, 14 and 7 px (self-attention at 7×7), 11 class embeddings."""
    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(width, 2 * width, 4 * width),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=NUM_CLASSES + 1,
    )


def train(variant: str, args: argparse.Namespace) -> tuple[UNet2DModel, Denoiser, float]:
    """Train one teacher; returns its EMA UNet, the EMA denoiser and the training seconds."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + (0 if variant == "vp" else 1))
    data = FashionMNISTDataset("train", args.data)
    scheduler = build_scheduler(variant)
    schedule = VPSchedule.from_diffusers(scheduler) if variant == "vp" else FlowSchedule(timestep_scale=1000.0)
    unet = build_unet(args.width, args.layers_per_block).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    denoiser = Denoiser(unet, schedule, "epsilon" if variant == "vp" else "flow", "unet2d")
    bar = tqdm(total=args.steps, desc=f"fashion-{variant}", unit="step")

    def report(step: int, loss: float, seconds: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch(torch.randint(0, len(data), (args.batch_size,), generator=generator))

    seconds = fit(denoiser, ema, variant, sample_batch, args, report, generator)
    bar.close()
    return ema, Denoiser(ema, schedule, denoiser.prediction_type, "unet2d"), seconds


@torch.no_grad()
def evaluate(denoiser: Denoiser, variant: str, args: argparse.Namespace) -> dict[str, float]:
    """50-step sampling at each ``--eval-guidance`` w: classifier FID to the train split and class accuracy."""
    from fewstep.eval.classifier import classifier_benchmark_metrics

    fid, accuracy = classifier_benchmark_metrics("fashion_mnist", classifier=args.classifier, batch_size=1000)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.eval_images, 1, 28, 28, generator=generator)
    labels = torch.arange(args.eval_images) % NUM_CLASSES
    teacher = Teacher(denoiser, null_cond=Conditioning(class_labels=torch.tensor([NULL_CLASS])), family="unet2d")
    taus = trailing_vp_grid(50) if variant == "vp" else linspace_grid(50)
    out = {}
    for w in args.eval_guidance:
        images = []
        for n, y in tqdm(list(zip(noise.split(250), labels.split(250))), desc=f"eval w={w:g}", unit="batch"):
            x0 = teacher.sample(n, Conditioning(class_labels=y), taus, guidance_scale=w)
            images.append(((x0 + 1) / 2).clamp(0, 1))
        images = torch.cat(images)
        out[f"w{w:g}_fid"] = round(fid.compute(images), 3)
        out[f"w{w:g}_accuracy"] = round(accuracy.compute(images, labels), 4)
        print(f"[{variant}] 50 steps, w={w:g}: FID {out[f'w{w:g}_fid']:.2f}  accuracy {out[f'w{w:g}_accuracy']:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["vp", "flow", "both"], default="both")
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--data", type=Path, default=None, help="directory of the Fashion-MNIST idx files")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=1000, help="0 skips the evaluation")
    parser.add_argument("--eval-guidance", type=lambda s: [float(w) for w in s.split(",")], default=[2.0])
    parser.add_argument("--classifier", default="fashion-classifier", help="asset name or directory")
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="save fp32 weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for variant in ("vp", "flow") if args.variant == "both" else (args.variant,):
        ema, denoiser, seconds = train(variant, args)
        info = {
            "variant": variant,
            "prediction_type": denoiser.prediction_type,
            "model_timestep": "integer index n (tau = (n+1)/1000)" if variant == "vp" else "1000 * s",
            "null_class": NULL_CLASS,
            "data": "Fashion-MNIST train split (fewstep.data.fashion.FashionMNISTDataset('train')), [-1, 1]",
            "train_seconds": round(seconds),
            "command": f"python scripts/train_fashion_teachers.py --variant {variant}",
            **{k: v for k, v in vars(args).items() if k not in ("variant", "out_dir", "data", "eval_guidance")},
        }
        if args.eval_images:
            info["eval_50_steps"] = evaluate(denoiser, variant, args)
        out = save(ema, variant, args, info, "fashion", "fewstep_teacher.json")
        print(f"[{variant}] trained in {seconds:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
