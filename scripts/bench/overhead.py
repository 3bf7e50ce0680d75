"""fewstep's overhead against bare PyTorch loops and stock diffusers, measured side by side in one run, into
``docs/results.md`` (the ``overhead`` section) and ``docs/results.json``.

    python scripts/bench/overhead.py                          # CPU, tiny models (a few minutes)
    python scripts/bench/overhead.py --device cuda --repeats 50

Training steps. fewstep runs its own trainer step (``Trainer.train_step``: accelerate's accumulate/autocast,
``objective.loss``, backward, clipping, the optimizer and LR-scheduler steps, the non-finite guard and its scalars) on
a fixed batch. The bare loop does the same network work written as diffusers' training examples write it, with no
fewstep code: accelerate, ``UNet(...).sample``, a scheduler's tables, peft LoRA adapters, AdamW, ``clip_grad_norm_``
when ``sync_gradients``, ``loss.item()`` for the logs. Both sides run the same networks on the same batch sizes
(checked: every backbone call's batch size is recorded on both sides and must match), the same LoRA config (rank,
alpha, target modules) and the same optimizer settings; data loading, text and VAE encoding are outside the timing
(a fixed batch of latents and prompt embeddings). Where fewstep shares one frozen base between roles (teacher =
adapters off, fake score = a second adapter), the bare loop keeps separate copies of the UNet, so it never switches
adapters: the cost of the shared layout is part of what is measured.

* ``lcm_lora``: LCM-LoRA on ``tiny:sd15`` (diffusers' ``train_lcm_distill_lora_sd_wds.py``): the student forward,
  the teacher's CFG forward (one batched call of 2·b), the target forward, Huber loss;
* ``dmd2_generator`` / ``dmd2_fake``: DMD2 on ``tiny:sd15`` with a LoRA generator and a LoRA fake score (tianweiy/DMD2's
  generator and guidance turns), real-branch CFG 1.75, no GAN;
* ``scm``: sCM on the shipped flow model ``fewstep:digits-flow`` (8×8, class-conditional) with a LoRA student: the
  teacher's guided velocity, the student's JVP (``torch.func.jvp``, as rCM) and its forward, adaptive weighting.

Sampling. A LoRA student of ``tiny:sd15`` (LCM-LoRA, its adapter made non-trivial) sampled by fewstep's LCM sampler
inside ``Student.sampling()`` against ``StableDiffusionPipeline`` + ``LCMScheduler`` with the same LoRA loaded by
``load_lora_weights`` and ``fuse_lora()``, both at guidance 1: ``denoise`` (prompt embeddings → latents: the sampler vs
``pipe(prompt_embeds=..., output_type="latent")``) and ``end_to_end`` (prompts → images: text encoding, sampling,
VAE decoding). fewstep without ``sampling()`` (eval mode switched per call, adapter unmerged) is timed too.

Start-up. ``fewstep --help``, ``fewstep recipes`` and ``fewstep validate`` as subprocesses, against
``python -c "import torch"``.

Every repetition runs each pair back to back (order alternating), after warm-up repetitions; the table shows the
median time of each side and ``ratio = fewstep / bare`` as the median of the per-repetition ratios (robust to load
changes on a shared machine; the ratio of the medians is in ``docs/results.json`` too). Goals: ≤ 1.03× for training
steps, ≤ 1.0× for sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # measure the fewstep of this checkout
from results_io import hardware, merge_records, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "overhead"
PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "a mountain lake"]
GOALS = {"train": 1.03, "sample": 1.0}
CASE_ORDER = [
    *("lcm_lora", "dmd2_generator", "dmd2_fake", "scm"),
    *("sample_denoise_1", "sample_denoise_4", "sample_end_to_end_1", "sample_end_to_end_4"),
    *("startup_help", "startup_recipes", "startup_validate"),
]


@dataclass
class Pair:
    """One measured comparison: ``fewstep()`` against ``bare()`` (each one repetition of the same work)."""

    case: str
    kind: str  # train | sample | startup
    fewstep: Callable[[], Any]
    bare: Callable[[], Any]
    what: str
    extra: dict[str, Callable[[], Any]] = field(default_factory=dict)  # further fewstep variants, timed alongside
    times: dict[str, list[float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def batch_sizes(models: list[nn.Module]) -> Iterator[list[int]]:
    """Record the batch size of every call of ``models`` (forward pre-hooks), in call order."""
    calls: list[int] = []
    seen = {id(m): m for m in models}
    handles = [
        m.register_forward_pre_hook(lambda _, args, kw: calls.append(_batch(args, kw)), with_kwargs=True)
        for m in seen.values()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _batch(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else next(iter(kwargs.values()))
    return int(x.shape[0])


def fewstep_trainer(recipe_dict: dict[str, Any], device: str, mixed_precision: str) -> Any:
    """fewstep's own ``Trainer`` for a recipe (components built as ``fewstep train`` builds them)."""
    from accelerate import Accelerator

    from fewstep.config import validate_recipe
    from fewstep.train.build import build_components
    from fewstep.train.loop import Trainer

    recipe = validate_recipe(recipe_dict)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")
    return Trainer(recipe, accelerator, build_components(recipe))


def recipe(teacher: str, objective: dict[str, Any], data: dict[str, Any], rank: int, out: str) -> dict[str, Any]:
    return {
        "teacher": {"pretrained": teacher, "guidance_scale": 2.0 if teacher.startswith("fewstep:") else 1.0},
        "student": {"kind": "lora", "lora": {"rank": rank, "alpha": rank}},
        "objective": objective,
        "data": data,
        "optim": {"lr": 1e-4, "weight_decay": 0.0, "grad_clip": 1.0, "lr_scheduler": "constant"},
        "train": {"max_steps": 10**6, "resume": "never", "sample_every": None, "progress": False},
        "output_dir": out,
    }


def add_lora(unet: nn.Module, rank: int, targets: list[str], name: str = "default") -> list[nn.Parameter]:
    """A peft LoRA on ``unet`` as diffusers' LoRA scripts add it; returns its trainable parameters (fp32)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, unet, adapter_name=name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


class BareLoop:
    """The diffusers-example skeleton around one loss: accumulate, backward, clip, step, log."""

    def __init__(self, accelerator: Any, model: nn.Module, params: list[nn.Parameter], lr: float = 1e-4) -> None:
        from diffusers.optimization import get_scheduler

        self.acc, self.model = accelerator, model
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
        scheduler = get_scheduler("constant", optimizer=optimizer)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)

    def step(self, loss_fn: Callable[[], Tensor]) -> dict[str, float]:
        acc = self.acc
        with acc.accumulate(self.model):
            with acc.autocast():
                loss = loss_fn()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach().item(), "lr": self.scheduler.get_last_lr()[0]}


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def tiny_sd15_unet(device: torch.device) -> tuple[nn.Module, Any, Any]:
    """A fresh copy of ``tiny:sd15``'s UNet, its DDPM scheduler and its pipeline."""
    from fewstep.testing import load_tiny_pipeline

    pipe = load_tiny_pipeline("sd15")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    return pipe.unet.to(device), pipe.scheduler, pipe


def sd15_batch(trainer: Any, batch_size: int, seed: int, with_x0: bool) -> Any:
    """One fixed fewstep ``Batch``: prompt embeddings (cond and the null prompt) and, if asked, random latents."""
    from fewstep.data.batch import Batch
    from fewstep.models.backbones import latent_shape
    from fewstep.models.prompts import encode_prompts

    teacher = trainer.teacher
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    cond, uncond = encode_prompts(teacher, prompts)
    x0 = torch.randn(latent_shape(teacher, batch_size), generator=torch.Generator().manual_seed(seed))
    device = trainer.acc.device
    return Batch(cond=cond.to(device), uncond=uncond.to(device), x0=x0.to(device) if with_x0 else None)


# ---------------------------------------------------------------------------------------------------------------------
# Training: LCM-LoRA
# ---------------------------------------------------------------------------------------------------------------------


def lcm_lora_pair(args: argparse.Namespace, tmp: Path) -> tuple[Pair, list[nn.Module], list[nn.Module]]:
    from accelerate import Accelerator

    objective = {"name": "lcm", "w_min": 5.0, "w_max": 15.0, "loss_type": "huber", "ema_target": False}
    data = {"source": "prompts", "prompts": PROMPTS, "batch_size": args.batch_size}
    trainer = fewstep_trainer(recipe("tiny:sd15", objective, data, args.rank, str(tmp / "lcm")), args.device,
                              args.mixed_precision)  # fmt: skip
    batch = sd15_batch(trainer, args.batch_size, 0, with_x0=True)
    trainer.batches = itertools.repeat(batch)
    targets = list(trainer.objective.student.lora_config.target_modules)

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    unet, scheduler, _ = tiny_sd15_unet(acc.device)
    teacher_unet = tiny_sd15_unet(acc.device)[0].requires_grad_(False).eval()
    loop = BareLoop(acc, unet, add_lora(unet, args.rank, targets))
    unet.train()
    acp = scheduler.alphas_cumprod.to(acc.device)
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    num_ddim, topk = 50, scheduler.config.num_train_timesteps // 50
    ddim_timesteps = (torch.arange(1, num_ddim + 1) * topk - 1).to(acc.device)  # DDIMSolver
    ddim_acp_prev = torch.cat([acp[:1], acp[ddim_timesteps[:-1]]])
    latents, cond = batch.x0.clone(), batch.cond.prompt_embeds.clone()
    both = torch.cat([batch.uncond.prompt_embeds, cond])

    def scalings(t: Tensor) -> tuple[Tensor, Tensor]:  # scalings_for_boundary_conditions
        scaled = 10.0 * t
        return 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5

    def loss() -> Tensor:
        b = latents.shape[0]
        index = torch.randint(0, num_ddim, (b,), device=latents.device)
        start_t = ddim_timesteps[index]
        t = (start_t - topk).clamp(min=0)
        c_skip_start, c_out_start = (_bc(c, latents) for c in scalings(start_t))
        c_skip, c_out = (_bc(c, latents) for c in scalings(t))
        noisy = scheduler.add_noise(latents, torch.randn_like(latents), start_t)
        w = _bc((15.0 - 5.0) * torch.rand(b) + 5.0, latents).to(latents.device)
        eps = unet(noisy, start_t, encoder_hidden_states=cond).sample
        pred_x0 = (noisy - _bc(sigma[start_t], noisy) * eps) / _bc(alpha[start_t], noisy)
        model_pred = c_skip_start * noisy + c_out_start * pred_x0
        with torch.no_grad():
            out_u, out_c = teacher_unet(torch.cat([noisy, noisy]), torch.cat([start_t, start_t]),
                                        encoder_hidden_states=both).sample.float().chunk(2)  # fmt: skip
            a, s = _bc(alpha[start_t], noisy), _bc(sigma[start_t], noisy)
            x0_u, x0_c = (noisy - s * out_u) / a, (noisy - s * out_c) / a
            pred_x0_cfg, pred_eps_cfg = x0_c + w * (x0_c - x0_u), out_c + w * (out_c - out_u)  # LCM's ω form
            prev = _bc(ddim_acp_prev[index], noisy)
            x_prev = prev.sqrt() * pred_x0_cfg + (1 - prev).sqrt() * pred_eps_cfg  # DDIMSolver.ddim_step
            target_eps = unet(x_prev.float(), t, encoder_hidden_states=cond).sample
            target_x0 = (x_prev - _bc(sigma[t], x_prev) * target_eps) / _bc(alpha[t], x_prev)
            target = c_skip * x_prev + c_out * target_x0
        return torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + 0.001**2) - 0.001)

    pair = Pair("lcm_lora", "train", trainer.train_step, lambda: loop.step(loss),
                f"LCM-LoRA step, tiny:sd15, batch {args.batch_size}, LoRA rank {args.rank}")  # fmt: skip
    return pair, [trainer.teacher.denoiser.backbone], [unet, teacher_unet]


# ---------------------------------------------------------------------------------------------------------------------
# Training: DMD2 (LoRA generator + LoRA fake score)
# ---------------------------------------------------------------------------------------------------------------------


def dmd2_pairs(args: argparse.Namespace, tmp: Path) -> tuple[list[Pair], list[nn.Module], list[nn.Module]]:
    from accelerate import Accelerator

    from fewstep.models.backbones import latent_shape

    objective = {"name": "dmd2", "fake_score": "lora", "real_guidance_scale": 1.75, "fake_steps_per_generator_step": 1,
                 "gan_weight": 0.0, "health_reference_steps": 0}  # fmt: skip
    data = {"source": "prompts", "prompts": PROMPTS, "batch_size": args.batch_size}
    trainer = fewstep_trainer(recipe("tiny:sd15", objective, data, args.rank, str(tmp / "dmd2")), args.device,
                              args.mixed_precision)  # fmt: skip
    batch = sd15_batch(trainer, args.batch_size, 1, with_x0=False)
    trainer.batches = itertools.repeat(batch)
    targets = list(trainer.objective.student.lora_config.target_modules)

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    real_unet, scheduler, _ = tiny_sd15_unet(acc.device)
    real_unet.requires_grad_(False).eval()
    gen_unet, fake_unet = tiny_sd15_unet(acc.device)[0], tiny_sd15_unet(acc.device)[0]
    gen = BareLoop(acc, gen_unet, add_lora(gen_unet, args.rank, targets))
    fake = BareLoop(acc, fake_unet, add_lora(fake_unet, args.rank, targets, "fake"))
    gen_unet.train(), fake_unet.train()
    acp = scheduler.alphas_cumprod.to(acc.device)
    cond = batch.cond.prompt_embeds.clone()
    both = torch.cat([batch.uncond.prompt_embeds, cond])
    shape = latent_shape(trainer.teacher, args.batch_size)
    t_max = scheduler.config.num_train_timesteps - 1

    def x0_of(eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        a = _bc(acp[t], x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def generate(grad: bool) -> Tensor:
        noise = torch.randn(shape, device=acc.device)
        t0 = torch.full((shape[0],), t_max, device=acc.device, dtype=torch.long)
        with contextlib.nullcontext() if grad else torch.no_grad():
            return x0_of(gen_unet(noise, t0, encoder_hidden_states=cond).sample, noise, t0)

    def generator_loss() -> Tensor:  # DMD2's generator turn: distribution matching loss
        x = generate(grad=True)
        t = torch.randint(20, 980, (shape[0],), device=acc.device)
        noisy = scheduler.add_noise(x.detach(), torch.randn_like(x), t)
        with torch.no_grad():
            fake_x0 = x0_of(fake_unet(noisy, t, encoder_hidden_states=cond).sample.float(), noisy, t)
            out_u, out_c = real_unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                                     encoder_hidden_states=both).sample.float().chunk(2)  # fmt: skip
            real_x0 = x0_of(out_u + 1.75 * (out_c - out_u), noisy, t)
            p_real, p_fake = x - real_x0, x - fake_x0
            grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
        return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())

    def fake_loss() -> Tensor:  # DMD2's guidance turn: denoising on generated samples
        x = generate(grad=False)
        t = torch.randint(0, t_max + 1, (shape[0],), device=acc.device)
        noise = torch.randn_like(x)
        eps = fake_unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=cond).sample
        return F.mse_loss(eps.float(), noise.float())

    def fewstep_phase(phase: str) -> Callable[[], Any]:
        def run() -> Any:
            while trainer.objective.phase(trainer.step) != phase:  # keep TTUR's order: step the other phase untimed
                trainer.step += 1
            return trainer.train_step()

        return run

    what = f"DMD2 {{}} step, tiny:sd15, batch {args.batch_size}, LoRA rank {args.rank} (generator and fake score)"
    pairs = [
        Pair("dmd2_generator", "train", fewstep_phase("student"), lambda: gen.step(generator_loss),
             what.format("generator")),
        Pair("dmd2_fake", "train", fewstep_phase("fake_score"), lambda: fake.step(fake_loss),
             what.format("fake-score")),
    ]  # fmt: skip
    return pairs, [trainer.teacher.denoiser.backbone], [real_unet, gen_unet, fake_unet]


# ---------------------------------------------------------------------------------------------------------------------
# Training: sCM on a flow model
# ---------------------------------------------------------------------------------------------------------------------


class _ContiguousGroupNorm(torch.overrides.TorchFunctionMode):
    """torch 2.13's ``group_norm`` forward-AD fails on non-contiguous input: what any JVP loop needs on it."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.group_norm and args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


class LogVarMLP(nn.Module):
    """sCM's adaptive weighting ``w(u)`` (Fourier features of ``u`` → MLP → log-variance), zero-initialised."""

    def __init__(self, num_freqs: int = 16, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, num_freqs + 1, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, u: Tensor) -> Tensor:
        arg = u.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([torch.cos(arg), torch.sin(arg)], 1))[:, 0]


class SCMStudent(nn.Module):
    """The trainable group of the bare loop: the LoRA'd UNet and the weighting MLP."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet, self.weighting = unet, LogVarMLP()


def scm_pair(args: argparse.Namespace, tmp: Path) -> tuple[Pair, list[nn.Module], list[nn.Module]]:
    from accelerate import Accelerator
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from fewstep.assets import ASSETS_DIR

    objective = {"name": "scm", "tangent_warmup_steps": 1000, "adaptive_weighting": True, "tangent": "jvp"}
    data = {"source": "digits", "batch_size": args.batch_size}
    trainer = fewstep_trainer(recipe("fewstep:digits-flow", objective, data, args.rank, str(tmp / "scm")),
                              args.device, args.mixed_precision)  # fmt: skip
    batch = next(trainer.batches)
    trainer.batches = itertools.repeat(batch)
    targets = list(trainer.objective.student.lora_config.target_modules)
    null_class = int(trainer.teacher.null_cond.class_labels[0])
    timestep_scale = float(trainer.teacher.schedule.timestep_scale)

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    teacher_unet = UNet2DModel.from_pretrained(ASSETS_DIR / "digits_flow", subfolder="unet").to(acc.device)
    unet = UNet2DModel.from_pretrained(ASSETS_DIR / "digits_flow", subfolder="unet").to(acc.device)
    for m in [*teacher_unet.modules(), *unet.modules()]:
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())  # the math attention: forward-mode AD runs through it
    teacher_unet.requires_grad_(False).eval()
    student = SCMStudent(unet)
    loop = BareLoop(acc, student, [*add_lora(unet, args.rank, targets), *student.weighting.parameters()])
    student.train()
    x0, labels = batch.x0.float().clone(), batch.cond.class_labels.clone()
    both_labels = torch.cat([torch.full_like(labels, null_class), labels])
    step = itertools.count()

    def trig_F(net: nn.Module, x: Tensor, u: Tensor, class_labels: Tensor, w: float | None = None) -> Tensor:
        """A flow model in TrigFlow coordinates (rCM's wrapper): F = cos u·ε̂ − sin u·x̂0, x_rf = x/(cos u + sin u)."""
        cos, sin = torch.cos(u), torch.sin(u)
        c_in = 1 / (cos + sin)
        s = sin * c_in
        x_rf = _bc(c_in, x) * x
        if w is None:
            v = net(x_rf, s * timestep_scale, class_labels=class_labels).sample.float()
        else:  # CFG on the velocity, one batched call
            v_u, v_c = net(torch.cat([x_rf, x_rf]), torch.cat([s, s]) * timestep_scale,
                           class_labels=class_labels).sample.float().chunk(2)  # fmt: skip
            v = v_u + w * (v_c - v_u)
        x0_hat, eps_hat = x_rf - _bc(s, x) * v, x_rf + _bc(1 - s, x) * v
        return _bc(cos, x) * eps_hat - _bc(sin, x) * x0_hat

    def loss() -> Tensor:
        r = min(1.0, next(step) / 1000)
        u = torch.atan(torch.exp(-0.8 + 1.6 * torch.randn(x0.shape[0]))).clamp(0, math.pi / 2).to(x0.device)
        x = _bc(torch.cos(u), x0) * x0 + _bc(torch.sin(u), x0) * torch.randn_like(x0)
        with torch.no_grad():
            F_teacher = trig_F(teacher_unet, x, u, both_labels, w=2.0)
        cs = torch.cos(u) * torch.sin(u)
        with torch.no_grad(), _ContiguousGroupNorm():
            F_minus, dF = torch.func.jvp(lambda x_, u_: trig_F(unet, x_, u_, labels), (x, u), (_bc(cs, x) * F_teacher,
                                                                                               cs))  # fmt: skip
        F_theta = trig_F(unet, x, u, labels)
        cos, sin = _bc(torch.cos(u.double()), x), _bc(torch.sin(u.double()), x)
        g = -(cos**2) * (F_minus.double() - F_teacher.double()) - r * (cos * sin * x.double() + dF.double())
        g = g / _bc(g.flatten(1).norm(dim=1) + 0.1, g)
        target = (F_minus.double() + g).float()
        per_sample = ((F_theta - target) ** 2).flatten(1).mean(1)
        logvar = student.weighting(u)
        per_sample = torch.exp(-logvar) * per_sample + logvar
        finite = torch.isfinite(per_sample)
        return torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum() / finite.sum().clamp(min=1)

    what = f"sCM step (JVP), fewstep:digits-flow (8×8), batch {args.batch_size}, LoRA rank {args.rank}"
    pair = Pair("scm", "train", trainer.train_step, lambda: loop.step(loss), what)
    return pair, [trainer.teacher.denoiser.backbone], [teacher_unet, unet]


# ---------------------------------------------------------------------------------------------------------------------
# Sampling: a LoRA student through fewstep's sampler vs the stock pipeline with fuse_lora()
# ---------------------------------------------------------------------------------------------------------------------


def lora_student(args: argparse.Namespace, tmp: Path, name: str) -> Any:
    """An LCM-LoRA ``Trainer`` on ``tiny:sd15`` whose adapter is made visible (B = 0 at init is the identity)."""
    objective = {"name": "lcm", "w_min": 0.0, "w_max": 0.0, "ema_target": False}
    data = {"source": "prompts", "prompts": PROMPTS, "batch_size": args.sample_batch_size}
    trainer = fewstep_trainer(recipe("tiny:sd15", objective, data, args.rank, str(tmp / name)), args.device,
                              args.mixed_precision)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in trainer.objective.student.denoiser.backbone.named_parameters():
            if "lora_B" in key:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return trainer


def sampling_pairs(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> list[Pair]:
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from fewstep.models.backbones import latent_shape
    from fewstep.models.prompts import encode_prompts
    from fewstep.models.vae import decode_latents
    from fewstep.testing import load_tiny_pipeline

    trainer, plain = lora_student(args, tmp, "sample"), lora_student(args, tmp, "sample_plain")  # equal weights
    teacher, student = trainer.teacher, trainer.objective.student
    sampler, plain_sampler = trainer.objective.sampler(), plain.objective.sampler()

    lora_dir = tmp / "lora"  # saved as diffusers' LCM-LoRA script saves it, loaded the stock way
    state = get_peft_model_state_dict(student.denoiser.backbone, adapter_name="default")
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=state)
    device = trainer.acc.device
    pipe = load_tiny_pipeline("sd15").to(device)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0)
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.sample_batch_size)]
    noise = torch.randn(latent_shape(teacher, len(prompts)), generator=torch.Generator().manual_seed(1)).to(device)
    cond, _ = encode_prompts(teacher, prompts)
    prompt_embeds = pipe.encode_prompt(prompts, device, 1, False)[0]

    def denoise(fn: Any, steps: int) -> Callable[[], Tensor]:
        return lambda: fn(noise, cond, steps, torch.Generator().manual_seed(2))

    def images(steps: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                c, _ = encode_prompts(teacher, prompts)  # the evaluation harness's path
                return decode_latents(teacher, sampler(noise, c, steps, torch.Generator().manual_seed(2)))

        return run

    def stock(steps: int, images: bool) -> Callable[[], Tensor]:
        kwargs = {"prompt": prompts, "output_type": "pt"} if images else {"prompt_embeds": prompt_embeds,
                                                                          "output_type": "latent"}  # fmt: skip
        return lambda: pipe(num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                            generator=torch.Generator().manual_seed(2), **kwargs).images  # fmt: skip

    with torch.no_grad():  # the same numbers: one step has no fresh noise, so both must agree
        ref = stock(1, False)()
        ours = denoise(sampler, 1)()
    print(f"[overhead] 1-step sample, fewstep vs stock pipeline: max |Δ| = {float((ours - ref).abs().max()):.2e} "
          f"(max |x| {float(ref.abs().max()):.1f})", flush=True)  # fmt: skip

    stack.enter_context(student.sampling())  # once, as fuse_lora() is called once on the pipeline
    pairs = []
    for s in args.sample_steps:
        what = f"LoRA student (LCM), tiny:sd15, {s} step{'s' if s > 1 else ''}, batch {len(prompts)}"
        pairs.append(
            Pair(
                f"sample_denoise_{s}",
                "sample",
                denoise(sampler, s),
                stock(s, False),
                f"{what}: prompt embeddings → latents",
                {"fewstep_unfused": denoise(plain_sampler, s)},
            )
        )
        pairs.append(
            Pair(
                f"sample_end_to_end_{s}",
                "sample",
                images(s),
                stock(s, True),
                f"{what}: prompts → images (text encoder, sampler, VAE)",
            )
        )
    return pairs  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------------------------------


def startup_pairs() -> list[Pair]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def proc(*argv: str) -> Callable[[], None]:
        return lambda: subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True)

    torch_import = proc("-c", "import torch")
    return [
        Pair("startup_help", "startup", proc("-m", "fewstep", "--help"), torch_import, "`fewstep --help`"),
        Pair("startup_recipes", "startup", proc("-m", "fewstep", "recipes"), torch_import, "`fewstep recipes`"),
        Pair("startup_validate", "startup", proc("-m", "fewstep", "validate", "quickstart/digits_lcm"), torch_import,
             "`fewstep validate quickstart/digits_lcm`"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_same_work(pair: Pair, ours: list[nn.Module], bare: list[nn.Module]) -> None:
    """Run one step on each side and compare the batch sizes of every backbone call (the same network work)."""
    with batch_sizes(ours) as a:
        pair.fewstep()
    with batch_sizes(bare) as b:
        pair.bare()
    if sorted(a) != sorted(b):
        raise SystemExit(f"{pair.case}: not the same work: fewstep calls {sorted(a)}, bare {sorted(b)}")
    print(f"[overhead] {pair.case}: backbone calls per step (batch sizes) {sorted(a)} on both sides", flush=True)


def run_pairs(pairs: list[Pair], repeats: int, warmup: int, device: torch.device) -> None:
    for rep in range(warmup + repeats):
        for pair in pairs:
            sides = [("fewstep", pair.fewstep), ("bare", pair.bare), *pair.extra.items()]
            for name, fn in sides if rep % 2 == 0 else sides[::-1]:
                seconds = timed(fn, device)
                if rep >= warmup:
                    pair.times.setdefault(name, []).append(seconds)
        if rep >= warmup and (rep - warmup + 1) % max(1, repeats // 4) == 0:
            print(f"[overhead] {rep - warmup + 1}/{repeats} repetitions", flush=True)


def record(pair: Pair, args: argparse.Namespace, where: str, date: str) -> dict[str, Any]:
    """One row: medians of each side and ``ratio``, the median of the per-repetition ratios (each repetition runs
    both sides back to back, so a load change on a shared machine hits both; ``ratio_of_medians`` is kept too)."""
    med = {k: statistics.median(v) for k, v in pair.times.items()}
    paired = statistics.median(a / b for a, b in zip(pair.times["fewstep"], pair.times["bare"]))
    out = {
        "benchmark": SECTION, "case": pair.case, "kind": pair.kind, "what": pair.what,
        "fewstep_ms": round(med["fewstep"] * 1e3, 3), "bare_ms": round(med["bare"] * 1e3, 3),
        "ratio": round(paired, 3), "ratio_of_medians": round(med["fewstep"] / med["bare"], 3),
        "goal": GOALS.get(pair.kind),
        "repeats": len(pair.times["fewstep"]), "device": args.device, "hardware": where, "date": date,
        "threads": torch.get_num_threads() if args.device == "cpu" else None, "note": args.note,
    }  # fmt: skip
    for name, seconds in med.items():
        if name not in ("fewstep", "bare"):
            out[f"{name}_ms"] = round(seconds * 1e3, 3)
    return out


def record_key(r: dict[str, Any]) -> tuple:
    return (r.get("benchmark"), r.get("case"), r.get("device"))


def format_section(records: list[dict[str, Any]], command: str) -> str:
    lines = [
        "## Overhead against bare PyTorch and stock diffusers",
        "",
        f"Written by `scripts/bench/overhead.py` (last run: `{command}`; see its docstring for exactly what each side "
        "does). Training: fewstep's own trainer step against a bare loop of the same network work written the way "
        "diffusers' training examples are (same tiny model, batch, LoRA config and optimizer; the backbone calls are "
        "checked to match). Sampling: a LoRA student through fewstep's sampler inside `Student.sampling()` against "
        'the stock pipeline after `fuse_lora()`. Start-up: subprocess wall time against `python -c "import torch"`. '
        "Times are medians over interleaved repetitions after warm-up; ratio = fewstep / bare, the median of the "
        "per-repetition ratios (goal ≤ 1.03× for training, ≤ 1.0× for sampling).",
        *[
            f"\nNote on the rows measured {d}: {n}"
            for d, n in sorted({(r["date"], r["note"]) for r in records if r.get("note")})
        ],  # fmt: skip
        "",
        "| case | what | fewstep ms | bare / stock ms | ratio | goal | runs | measured on |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(records, key=lambda r: (r["device"], CASE_ORDER.index(r["case"]) if r["case"] in CASE_ORDER
                                            else len(CASE_ORDER), r["case"])):  # fmt: skip
        extra = f" (without `sampling()`: {r['fewstep_unfused_ms']:.1f})" if "fewstep_unfused_ms" in r else ""
        goal = f"≤ {r['goal']:.2f}" if r.get("goal") else "–"
        lines.append(
            f"| {r['case']} | {r['what']} | {r['fewstep_ms']:.1f}{extra} | {r['bare_ms']:.1f} | "
            f"**{r['ratio']:.2f}×** | {goal} | {r['repeats']} | {r['hardware']}, {r['date']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c],
                        default=["lcm_lora", "dmd2", "scm", "sampling", "startup"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per pair (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--startup-repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=4, help="training batch")
    parser.add_argument("--sample-batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--note", default="", help="a remark stored with the rows (e.g. the machine was busy)")
    parser.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--results-json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    records: list[dict[str, Any]] = []
    where, date = hardware(device), today()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        train: list[Pair] = []
        for name, build in (("lcm_lora", lcm_lora_pair), ("dmd2", dmd2_pairs), ("scm", scm_pair)):
            if name in args.cases:
                built, ours, bare = build(args, Path(tmp))
                for pair in built if isinstance(built, list) else [built]:
                    check_same_work(pair, ours, bare)
                    train.append(pair)
        if train:
            run_pairs(train, args.repeats, args.warmup, device)
        if "sampling" in args.cases:
            sample = sampling_pairs(args, Path(tmp), stack)
            run_pairs(sample, args.repeats, args.warmup, device)
            train += sample
            stack.close()
        if "startup" in args.cases:
            startup = startup_pairs()
            run_pairs(startup, args.startup_repeats, 1, torch.device("cpu"))
            train += startup
        records = [record(p, args, where, date) for p in train]
    command = "python scripts/bench/overhead.py" + ("" if not argv else " " + shlex.join(argv))
    if args.no_write:
        print(format_section(records, command))
        return 0
    everything = merge_records(args.results_json, records, record_key)
    section = format_section([r for r in everything if r.get("benchmark") == SECTION], command)
    write_section(args.results_md, SECTION, section)
    print(section)
    print(f"[overhead] wrote {args.results_md} and {args.results_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
