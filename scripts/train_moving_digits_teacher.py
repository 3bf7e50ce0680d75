"""Train the moving-digits video teacher that ships with fewstep (``fewstep:moving-digits-flow``): the teacher of the
video benchmark (``scripts/bench/video_quality.py``).

    python scripts/train_moving_digits_teacher.py          # into fewstep/assets/moving_digits_flow/

The data are ``fewstep.data.moving_digits.MovingDigitsDataset('train')``: clips of 8 frames, 24×24 pixels, one
scikit-learn digit moving and bouncing (``[1, 8, 24, 24]`` in ``[-1, 1]``). The teacher is a small
``diffusers.WanTransformer3DModel`` on the pixels (1 channel, patches of 1×3×3, so 8·8·8 = 512 tokens with full 3-D
self-attention and Wan's 3-D rotary positions), class-conditional through its one text token: the one-hot class label
over 11 entries, the last being the null class that replaces the label with probability 0.1 for classifier-free
guidance (the ``wan_class`` adapter of ``fewstep.models.backbones``). It is trained by flow matching as the flow
digits teacher (``x_s = (1 − s)·x0 + s·ε``, fed ``1000·s``, predicting ``u = ε − x0``; the same loss and EMA, from
``scripts/train_digits_teachers.py``) and saved as ``DDPMPipeline(unet=transformer, scheduler)`` with a
``FlowMatchEulerDiscreteScheduler`` and fp16 safetensors (under 1 MB), plus ``fewstep_video.json``, the training record
and the clip shape the teacher generates.

Seeded and deterministic on a CPU; one thread by default.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits_teachers import NULL_CLASS, fit, save  # noqa: E402

import fewstep.models.backbones  # noqa: E402, F401  (registers the "wan_class" adapter)
from fewstep.data.moving_digits import FRAME_SIZE, NUM_FRAMES, MovingDigitsDataset  # noqa: E402
from fewstep.models import Denoiser  # noqa: E402
from fewstep.noise.schedules import FlowSchedule  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "fewstep" / "assets"


def build_transformer(width: int, layers: int, heads: int, patch: int, patch_frames: int = 1) -> WanTransformer3DModel:
    """A pixel-space class-conditional Wan transformer: ``width`` channels in ``heads`` heads, ``layers`` blocks,
    spatial patches of ``patch``² pixels (one frame each), a one-hot class token of ``NULL_CLASS + 1`` entries."""
    return WanTransformer3DModel(
        patch_size=(patch_frames, patch, patch),
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=1,
        out_channels=1,
        text_dim=NULL_CLASS + 1,
        freq_dim=64,
        ffn_dim=2 * width,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )


def train(
    args: argparse.Namespace, checkpoint: Callable[[WanTransformer3DModel, int], object]
) -> tuple[WanTransformer3DModel, Denoiser, float]:
    """Train the teacher; returns its EMA transformer, the EMA denoiser and the training seconds. ``checkpoint(ema,
    step)`` is called every ``--save-every`` steps (the EMA so far, saved so a long run can be inspected early)."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    data = MovingDigitsDataset("train", num_frames=args.frames, size=args.size, clips_per_digit=args.clips_per_digit)
    schedule = FlowSchedule(timestep_scale=1000.0)
    model = build_transformer(args.width, args.layers, args.heads, args.patch, args.patch_frames).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    denoiser = Denoiser(model, schedule, "flow", "wan_class")

    def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return data.batch(torch.randint(0, len(data), (args.batch_size,), generator=generator))

    def report(step: int, loss: float, seconds: float) -> None:
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss:.4f}  {seconds:.0f} s", flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            checkpoint(ema, step)

    seconds = fit(denoiser, ema, "flow", sample_batch, args, report, generator)
    return ema, Denoiser(ema, schedule, "flow", "wan_class"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--patch", type=int, default=3)
    parser.add_argument("--patch-frames", type=int, default=1, help="frames per token")
    parser.add_argument("--frames", type=int, default=NUM_FRAMES)
    parser.add_argument("--size", type=int, default=FRAME_SIZE)
    parser.add_argument("--clips-per-digit", type=int, default=4)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=500, help="save the EMA every N steps (0: at the end)")
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="save fp32 weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def record(seconds: float, steps: int) -> dict:
        return {
            "variant": "flow",
            "prediction_type": "flow",
            "model_timestep": "1000 * s",
            "null_class": NULL_CLASS,
            "video_size": [args.frames, args.size, args.size],
            "data": "fewstep.data.moving_digits.MovingDigitsDataset('train'), clips [1, F, H, W] in [-1, 1]",
            "train_seconds": round(seconds),
            "trained_steps": steps,
            "command": "python scripts/train_moving_digits_teacher.py",
            **{k: v for k, v in vars(args).items() if k != "out_dir"},
        }

    start = time.perf_counter()

    def checkpoint(ema: WanTransformer3DModel, step: int) -> None:
        save(copy.deepcopy(ema), "flow", args, record(time.perf_counter() - start, step), "moving_digits",
             "fewstep_video.json")  # fmt: skip

    ema, _, seconds = train(args, checkpoint)
    out = save(ema, "flow", args, record(seconds, args.steps), "moving_digits", "fewstep_video.json")
    print(f"trained in {seconds:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
