"""Helpers shared by the test files: thread pinning, a fresh ``accelerate`` state, the 2-D toys (an 8-Gaussian
mixture and small MLP teachers trained on it), export comparisons against stock pipelines, and multi-process
training. Test files import from here (``from tests.helpers import ...``), never from each other.

Fixtures defined here take effect in a test module (or ``conftest.py``) that imports them by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import from_x0_eps
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.testing.images import captioned_noise_images  # noqa: F401 (the tests import it from here)

# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; more threads only contend with the other test worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run gets its own ``Accelerator`` settings (accelerate keeps process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------------------------------
# The 2-D toys: an 8-Gaussian mixture and MLP denoisers trained on it
# ---------------------------------------------------------------------------------------------------------------------

NULL_CLASS = 4


class ToyNet(nn.Module):
    """A small MLP denoiser on 2-D points, optionally class-conditional (class ``NULL_CLASS`` = unconditional)."""

    def __init__(self, time_scale: float, width: int = 128, num_classes: int = 0) -> None:
        super().__init__()
        self.time_scale = time_scale
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)))
        self.embed = nn.Embedding(num_classes, 16) if num_classes else None
        inp = 2 + 16 + (16 if num_classes else 0)
        self.net = nn.Sequential(
            nn.Linear(inp, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        t = (timestep.float() * self.time_scale)[:, None] * self.freqs[None]
        feats = [x.float(), torch.sin(t), torch.cos(t)]
        if self.embed is not None:
            feats.append(self.embed(class_labels))
        return self.net(torch.cat(feats, 1))


def mixture(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """8 Gaussians (std 0.1) on a circle of radius 2."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    return 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + 0.1 * torch.randn(n, 2, generator=generator)


def mode_counts(x: torch.Tensor) -> torch.Tensor:
    """Samples per mixture component (nearest of the 8 centres, within 0.5)."""
    angle = torch.arange(8).float() * (2 * math.pi / 8)
    centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    dist = torch.cdist(x, centres)
    near = dist.min(1).values < 0.5
    return torch.bincount(dist.argmin(1)[near], minlength=8)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 64) -> float:
    """Sliced W2 between two equal-size point clouds (fixed projections)."""
    d = torch.randn(2, num_projections, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def vp_schedule() -> VPSchedule:  # SD's scaled-linear betas
    return VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))


def make_teacher(kind: str, num_classes: int = 0) -> Teacher:
    """An untrained ``ToyNet`` teacher: ``kind`` ``"flow"`` (rectified flow) or ``"vp"`` (SD's VP schedule, ε)."""
    if kind == "flow":
        schedule, pred, time_scale = FlowSchedule(timestep_scale=1.0), "flow", 1.0
    else:
        schedule, pred, time_scale = vp_schedule(), "epsilon", 1 / 1000
    null = Conditioning(class_labels=torch.tensor([NULL_CLASS])) if num_classes else None
    return Teacher.from_module(ToyNet(time_scale, num_classes=num_classes), schedule, pred, null_cond=null)


def train_teacher(kind: str, steps: int = 1000) -> Teacher:
    """Plain denoising / flow-matching training on the mixture (seeded, ~2 s)."""
    torch.manual_seed(0)
    teacher = make_teacher(kind)
    net, sched = teacher.denoiser.backbone, teacher.schedule
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = mixture(512)
        eps = torch.randn_like(x0)
        tau = torch.rand(512) if kind == "flow" else (torch.randint(0, 1000, (512,)) + 1) / 1000
        a, s = sched.alpha(tau), sched.sigma(tau)
        out = net(a[:, None] * x0 + s[:, None] * eps, sched.model_timestep(tau))
        loss = ((out - from_x0_eps(x0, eps, a, s, teacher.denoiser.prediction_type)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return teacher


class Echo(torch.nn.Module):
    """A parameter-free backbone that returns its input (for data and conditioning plumbing)."""

    def forward(self, x, timestep, class_labels=None):
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Attention reference
# ---------------------------------------------------------------------------------------------------------------------


def math_sdpa(q, k, v, mask=None, scale=None):
    """PyTorch's math SDPA backend (the reference the attention kernels are compared with)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------------------------------
# Export: stock diffusers pipelines against the student's own sampler
# ---------------------------------------------------------------------------------------------------------------------

TOLERANCE = 1e-4  # measured on the tiny models: LoRA reload ≤ 4e-6, merged (fused weights) ≤ 2e-5
RELOAD = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}  # the tiny SD3 has no T5 on disk


def stock_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    """The stock pipeline's output latents for given initial latents and re-noise seed."""
    kwargs = {"prompt_embeds": cond.prompt_embeds}
    if cond.pooled_prompt_embeds is not None:
        kwargs["pooled_prompt_embeds"] = cond.pooled_prompt_embeds
    torch.manual_seed(seed)  # pipelines that do not pass `generator` to scheduler.step (SD3) use the global RNG
    return pipe(
        **kwargs, latents=noise.clone(), output_type="latent", generator=torch.Generator().manual_seed(seed),
        **spec.call_kwargs(num_steps),
    ).images  # fmt: skip


def max_diff_to_student(objective, pipe, spec, cond, shape) -> float:
    """The largest latent difference between the stock pipeline and the student's sampler at 1, 2 and 4 steps."""
    pipe.set_progress_bar_config(disable=True)
    diffs = []
    for num_steps in (1, 2, 4):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + num_steps))
        ours = objective.sampler()(noise, cond, num_steps, torch.Generator().manual_seed(num_steps))
        theirs = stock_latents(pipe, spec, cond, noise, num_steps, num_steps)
        assert ours.abs().max() > 0.1  # a real sample, not an empty tensor
        diffs.append((theirs.float() - ours).abs().max().item())
    return max(diffs)


# ---------------------------------------------------------------------------------------------------------------------
# Training in subprocesses
# ---------------------------------------------------------------------------------------------------------------------


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a ``fewstep`` subprocess: one thread, offline, unbuffered, a cache under ``tmp_path``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return env


def free_port() -> int:
    """A TCP port no one listens on now. Two launches on accelerate's default port 29500 at once (tests run in
    parallel) collide: the second either fails to bind or joins the first job's rendezvous and aborts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_command(recipe: Path) -> list[str]:
    """``accelerate launch`` of ``fewstep train recipe`` with two CPU processes (gloo DDP) on a port of its own."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "fewstep", "train", str(recipe),
    ]  # fmt: skip


GLOO_ABORT = "terminate called without an active exception"  # a rare gloo abort of a rank (~1 launch in 20 here)


def launch_two(recipe: Path, tmp_path: Path) -> dict[str, Any]:
    """``launch_two_command``, run; the run's summary. A launch killed by gloo's rare abort is run once more from the
    run directory as it was before the launch (a copy restored: a launch that resumes a checkpoint resumes it again),
    so the test judges the training, not that abort."""
    import shutil

    from fewstep.config import load_recipe

    env = dict(subprocess_env(tmp_path), ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"))
    run_dir = Path(load_recipe(recipe).output_dir)
    before = run_dir.with_name(run_dir.name + ".before_launch")
    shutil.rmtree(before, ignore_errors=True)
    if run_dir.exists():
        shutil.copytree(run_dir, before)
    result = subprocess.run(launch_two_command(recipe), env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and GLOO_ABORT in result.stderr:
        shutil.rmtree(run_dir, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, run_dir)
        result = subprocess.run(launch_two_command(recipe), env=env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(before, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "run_summary.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Reliability: tiny digits runs and one-line errors
# ---------------------------------------------------------------------------------------------------------------------


def digits_lora_recipe(
    output_dir: Path, optim: dict[str, Any] | None = None, max_steps: int = 4, checkpoint_every: int = 1, **train: Any
) -> dict[str, Any]:
    """A recipe dict for a tiny run: a rank-4 LoRA on the shipped digits teacher, the diffusion objective, batch 8,
    constant lr 1e-3, ``max_steps`` steps with a checkpoint every ``checkpoint_every``; ``optim`` and ``train`` update
    their blocks."""
    return {
        "teacher": {"pretrained": "fewstep:digits-vp"},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "diffusion"},
        "data": {"source": "digits", "batch_size": 8},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0, **(optim or {})},
        "train": {"max_steps": max_steps, "checkpoint_every": checkpoint_every, "keep_last": 10, "sample_every": None,
                  "progress": False, "resume": "auto", **train},
        "output_dir": str(output_dir),
    }  # fmt: skip


TINY_LCM_RECIPE = """\
teacher: {pretrained: "fewstep:digits-vp", guidance_scale: 1.0}
student: {kind: full}
objective: {name: lcm, w_min: 0.0, w_max: 0.0}
data: {source: digits, batch_size: 4}
train: {max_steps: 1, checkpoint_every: 1, sample_every: null, log_every: 1, progress: false}
output_dir: OUT
"""  # a one-step LCM run of the shipped digits teacher; OUT is replaced by the test's output directory


def one_error(err: str, *needles: str) -> str:
    """The single ``error:`` line of a command's stderr (no traceback), containing every needle."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train_dmd2_adapters(objective: Any, cond: Any, uncond: Any, shape: tuple[int, ...], steps: int = 4) -> None:
    """Alternate fake-score and generator steps of a DMD2 ``objective`` (``train_at_phases``), so that both LoRA
    adapters move away from B = 0 before an export is checked."""
    train_at_phases(objective, cond, uncond, shape, steps, phase=lambda step: ("fake_score", "student")[step % 2])


def train_at_phases(
    objective: Any, cond: Any, uncond: Any, shape: tuple[int, ...], steps: int = 3, phase: Any = None
) -> None:
    """``steps`` steps of ``objective`` (AdamW, lr 1e-2, one optimizer per trainable role) on random ``x0`` of
    ``shape``, each at ``phase(step)`` (default: the objective's own ``phase``), so that every role it trains moves
    away from its start before an export is checked."""
    import torch

    from fewstep.data.batch import Batch

    phase = phase or objective.phase
    opts = {k: torch.optim.AdamW(list(m.parameters()), lr=1e-2) for k, m in objective.trainable().items()}
    for step in range(steps):
        role = phase(step)
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, role)
        assert torch.isfinite(out.loss), (step, role, out.metrics)
        opts[role].zero_grad()
        out.loss.backward()
        opts[role].step()


def move_lora_away(student: Any, std: float = 0.05) -> Any:
    """``student`` with every ``lora_B`` drawn from N(0, ``std``²) (in place, from the global RNG): adapters that
    change the network, so that an export or loader test compares something other than the base model."""
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return student


@contextlib.contextmanager
def diffusers_warnings():
    """The warnings diffusers logs in the block (its loggers do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def stock_lora_pipeline(pipeline_class: Any, teacher: Teacher, out: Path, spec: Any, expected: tuple[str, ...] = ()):
    """The stock ``pipeline_class`` of the tiny ``teacher`` with the exported LoRA (``load_lora_weights``) and
    scheduler of ``out``. Loading must warn of nothing (no unexpected or missing keys) but notices that start with one
    of ``expected`` (e.g. a text encoder that got no LoRA keys: fewstep trains the backbone only)."""
    import diffusers

    from fewstep.export import WEIGHT_NAME

    pipe = pipeline_class.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    with diffusers_warnings() as warned:
        pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    messages = [r.getMessage() for r in warned]
    assert [m for m in messages if not m.startswith(expected or ("\0",))] == [], messages
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_levels(run: Any, num_steps: int) -> torch.Tensor:
    """The ``num_steps`` input levels a stock pipeline steps through: ``run(callback_on_step_end=...)`` calls it, and
    the callback reads its scheduler's sigmas at the first step."""
    seen = []

    def record(pipeline, i, t, kwargs):
        seen.append(pipeline.scheduler.sigmas.clone())
        return kwargs

    run(callback_on_step_end=record)
    return seen[0][:num_steps]


def one_step_diff(objective: Any, stock: Any, cond: Any, noise: torch.Tensor, label: str) -> tuple[torch.Tensor, float]:
    """The student's one-step sample from ``noise`` and its largest difference to ``stock()`` (the stock pipeline's
    one-step latents from the same noise), printed under ``label``; both must be a real sample within ``TOLERANCE``."""
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    diff = float((stock() - ours).abs().max())
    print(f"{label}, 1 step: max |stock − fewstep| = {diff:.2e}")
    assert ours.abs().max() > 0.1 and diff < TOLERANCE, diff
    return ours, diff
