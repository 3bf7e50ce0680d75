"""``reflow``: 2-rectified flow on stored teacher couplings with rfpp's choices.

Liu et al. 2022 ("Flow Straight and Fast"); Lee et al. 2024 ("Improving the Training of Rectified Flows", rfpp,
``sangyun884/rfpp``); SlimFlow (Zhu et al. 2024) for the smaller student. One step, on a batch of pairs
``(ε, x̃0 = Φ_T(ε, c), c)`` written by ``fewstep.data.reflow`` (``data.source: pairs``):

1. τ from rfpp's U-shaped density (``a = 4``), clipped to ``[1e-5, 1 − 1e-5]`` (VP teachers: rounded to their
   integer grid);
2. ``x_τ = α(τ)·x̃0 + σ(τ)·ε``, with the pair's own noise (SlimFlow's annealing reflow mixes in fresh noise,
   ``ε' = √(1 − β)·ε + √β·z``, β annealed 1 → 0 over ``anneal_steps``);
3. the student's output against the coupling's target in the student's own prediction type (for a flow model the
   velocity ``ε − x̃0``: exactly 2-RF), with rfpp's pseudo-Huber ``c = 0.00054·d`` or LPIPS-Huber
   ``(1 − τ)·Huber + LPIPS(x̂0, x̃0)``.

The student starts as the teacher (``student.kind: full`` or ``lora``), or as a smaller randomly initialised
network (SlimFlow: ``student_backbone`` overrides, full students only). Sampling: rfpp's noise-reusing sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fewstep.models.student import Student, smaller_backbone
from fewstep.models.teacher import Teacher
from fewstep.noise import timesteps
from fewstep.noise.convert import from_x0_eps
from fewstep.objectives.losses import check_lpips_space, load_lpips, lpips_distance, pseudo_huber_distance
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.reflow.sampler import ReflowSampler
from fewstep.objectives.spec import SamplingSpec, deterministic_spec
from fewstep.solvers.steps import noise_to

RFPP_TAU_CLIP = 1e-5  # rfpp t_dist.py


class ReflowConfig(BaseModel):
    """Recipe block of the ``reflow`` objective (defaults: rfpp)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["reflow"] = "reflow"
    time_sampler: Literal["u_shaped", "uniform", "logit_normal"] = "u_shaped"
    u_shape_a: float = Field(4.0, gt=0.0, description="rfpp's U-shaped density ∝ cosh(a·(τ − ½))")
    loss_type: Literal["l2", "pseudo_huber", "lpips_huber"] = "pseudo_huber"
    huber_c: float | None = Field(None, gt=0.0, description="pseudo-Huber c; None: rfpp's 0.00054·d")
    lpips_weights: str | None = Field(None, description="TorchScript LPIPS file (lpips_huber); never downloaded")
    lpips_divide_by_tau: bool = Field(False, description="rfpp option: LPIPS term divided by τ")
    sampler: Literal["noise_reuse", "euler"] = "noise_reuse"
    anneal_steps: int = Field(0, ge=0, description="SlimFlow annealing reflow: β from 1 to 0 over these steps")
    student_backbone: dict[str, Any] | None = Field(
        None, description="SlimFlow: config overrides for a smaller, randomly initialised full student"
    )


def sample_tau(schedule: Any, n: int, config: ReflowConfig) -> Tensor:
    """Training levels ``[n]``: U-shaped / uniform / logit-normal, clipped as rfpp; VP: on the integer grid."""
    if config.time_sampler == "u_shaped":
        tau = timesteps.u_shaped(n, None, config.u_shape_a)
    elif config.time_sampler == "uniform":
        tau = timesteps.uniform(n)
    else:
        tau = timesteps.logit_normal(n)
    tau = tau.clamp(RFPP_TAU_CLIP, 1 - RFPP_TAU_CLIP)
    if schedule.kind == "vp":
        return schedule.tau_from_model_timestep(schedule.model_timestep(tau))
    return tau


def anneal_beta(step: int, anneal_steps: int) -> float:
    """SlimFlow's mixing coefficient: 1 (independent noise, 1-RF) → 0 (the teacher's coupling), linear."""
    return 0.0 if anneal_steps == 0 else max(0.0, 1.0 - step / anneal_steps)


def pair_noise(batch: Batch, objective: str) -> Tensor:
    noise = batch.extra.get("noise")
    if noise is None or batch.x0 is None:
        raise ValueError(
            f"The {objective} objective trains on reflow pairs (noise, teacher sample, condition): use "
            "data.source: pairs with data.path from `fewstep pairs <recipe>`."
        )
    return noise


@OBJECTIVES.register("reflow")
class Reflow:
    """2-rectified flow (with rfpp's choices) on teacher couplings.

    Args:
        config: the ``objective`` recipe block.
        teacher: the teacher whose pairs are trained on (schedule, prediction type; VP or flow).
        student: initialised from the teacher (full or LoRA); replaced by a smaller network for SlimFlow.
        backbone: from Python, any smaller module to train instead (SlimFlow); needs a full student.
    """

    Config = ReflowConfig
    bypasses_prepared = False

    def __init__(
        self, config: ReflowConfig, teacher: Teacher, student: Student, backbone: nn.Module | None = None
    ) -> None:
        if teacher.schedule.kind not in ("vp", "flow"):
            raise ValueError(f"reflow needs a VP or flow teacher; got a {teacher.schedule.kind!r} schedule.")
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        if backbone is not None or config.student_backbone is not None:
            if student.is_lora:
                raise ValueError(
                    "A smaller SlimFlow student (objective.student_backbone) is a new network: set student.kind: full."
                )
            new = (
                backbone
                if backbone is not None
                else smaller_backbone(student.denoiser.backbone, config.student_backbone)
            )
            student.denoiser.backbone = new.requires_grad_(True).train()
        self.lpips: nn.Module | None = None
        if config.loss_type == "lpips_huber":
            check_lpips_space(teacher)
            self.lpips = load_lpips(config.lpips_weights)
        self._online: nn.Module = student

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._online = prepared["student"]

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        return "student"

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """``E[(1−τ)·]d(out_θ(x_τ, τ, c), target(x̃0, ε))`` on the pairs."""
        cfg = self.config
        noise, x0 = pair_noise(batch, "reflow").float(), batch.x0.float()  # [b, ...]
        beta = anneal_beta(step, cfg.anneal_steps)
        if beta > 0:  # SlimFlow annealing reflow: ε' = √(1 − β)·ε + √β·z (still N(0, I))
            noise = math.sqrt(1 - beta) * noise + math.sqrt(beta) * torch.randn_like(noise)
        tau = sample_tau(self.schedule, x0.shape[0], cfg).to(x0.device)
        x_tau = noise_to(self.schedule, x0, noise, tau)
        pred = self._online(x_tau, tau, batch.cond)
        alpha, sigma = self.schedule.alpha(tau), self.schedule.sigma(tau)
        kind = self.student.denoiser.prediction_type
        out = from_x0_eps(pred.x0, pred.eps, alpha, sigma, kind)  # flow: û, the velocity
        target = from_x0_eps(x0, noise, alpha, sigma, kind)  # flow: ε − x̃0
        if cfg.loss_type == "l2":
            per_sample = ((out - target) ** 2).flatten(1).mean(1)
        else:
            per_sample = pseudo_huber_distance(out, target, cfg.huber_c)
        if cfg.loss_type == "lpips_huber":  # rfpp: (1 − τ)·Huber + LPIPS(up224(x̂0), up224(x̃0)) [/τ]
            perceptual = lpips_distance(self.lpips.to(x0.device), pred.x0, x0)
            if cfg.lpips_divide_by_tau:
                perceptual = perceptual / tau
            per_sample = (1 - tau) * per_sample + perceptual
        loss = per_sample.mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "tau_mean": float(tau.mean()), "anneal_beta": beta})

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def sampler(self) -> ReflowSampler:
        return ReflowSampler(self.student.denoiser, self.schedule, self.config.sampler)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"The reflow objective keeps no state; got keys {sorted(state)}.")

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4)) -> SamplingSpec:
        return deterministic_spec(self.teacher, "reflow", steps, self.config.sampler, recommended=2)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""
