"""rCM: score-regularised continuous-time consistency (NVIDIA 2025, arXiv 2510.08431).

sCM (forward divergence, mode-covering) plus DMD (reverse divergence, mode-seeking) as a "long-skip" regulariser,
following ``NVlabs/rcm``: for ``step < tangent_warmup_steps`` sCM only; afterwards one student iteration per
``critic_steps_per_student_step + 1`` steps, the others train the fake score. A student iteration adds
``scm_weight·L_sCM`` and ``dmd_weight·L_DMD``:

* backward simulation: ``n = (student iteration % max_backsim_steps) + 1`` student steps from pure noise in
  TrigFlow (re-noise sampling; the intermediate times drawn from ``p_D`` and forced monotone, as rCM, or the
  sampler's angles with ``backsim_times: sampler``), only the last with grad, giving ``G``;
* ``u_D`` from ``p_D`` (RF-uniform with shift ``dmd_shift``), ``x_u = cos u·G + sin u·ε``;
* ``g = (x̂0_fake − x̂0_teacher^cfg)/mean|G − x̂0_teacher^cfg|`` and the injected loss — DMD's pure functions
  (``fewstep.objectives.dmd.functional``: ``dm_gradient``, ``injected_loss``, ``denoising_loss``).

The critic (fake score, a second LoRA on the shared base or a full copy: ``fewstep.objectives.dmd.roles``) learns
``‖G − x̂0_fake(x_u)‖²/sin²u``, i.e. the TrigFlow F-regression on the student's samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student, adapters_disabled
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import bcast
from fewstep.objectives.consistency.scm import (
    AdaptiveWeight,
    SCMConfig,
    SCMSampler,
    check_teacher,
    pipeline_scheduler,
    sample_u,
    scm_update,
    trigflow_sampler,
    trigflow_sampling_spec,
)
from fewstep.objectives.consistency.trigflow import consistency_fn, teacher_trig_velocity, trig_F, trig_noise, u_range
from fewstep.objectives.dmd.functional import denoising_loss, dm_gradient, injected_loss
from fewstep.objectives.dmd.roles import AdapterRole, active_adapter, fake_role, student_role
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec


class RCMConfig(SCMConfig):
    """Recipe block of ``rcm``: the sCM settings plus the DMD term and the critic (defaults: rCM's Wan config)."""

    name: Literal["rcm"] = "rcm"  # type: ignore[assignment]
    tangent_warmup_steps: int = Field(1000, ge=0, description="sCM only before this step; then sCM + DMD")
    scm_weight: float = Field(100.0, ge=0.0)
    dmd_weight: float = Field(1.0, ge=0.0)
    critic_steps_per_student_step: int = Field(4, ge=0, description="rCM: 1 student step per 4 critic steps")
    max_backsim_steps: int = Field(4, ge=1, description="backward simulation depth cycles through 1..this")
    dmd_shift: float = Field(5.0, gt=0.0, description="p_D: RF-uniform s with this static shift")
    backsim_times: Literal["random", "sampler"] = Field(
        "random", description="rCM: intermediate times from p_D, forced monotone; sampler: the sampler's angles"
    )
    fake_score: Literal["lora", "full"] | None = Field(None, description="None: lora for a LoRA student, else full")
    fake_lora_rank: int | None = Field(None, ge=1)


def backsim_angles(
    n: int, num_steps: int, top: Tensor, shift: float, lo: float, hi: float, generator: torch.Generator | None = None
) -> Tensor:
    """rCM's backward-simulation times ``[num_steps, n]``: pure noise at ``top``, then draws from ``p_D`` forced
    monotone (each the ``min`` with the previous one), so every sample's chain goes down in noise."""
    angles = [top.float().expand(n)]
    for _ in range(num_steps - 1):
        angles.append(torch.minimum(sample_u_dmd(n, shift, lo, hi, generator), angles[-1]))
    return torch.stack(angles)


def sample_u_dmd(n: int, shift: float, lo: float, hi: float, generator: torch.Generator | None = None) -> Tensor:
    """rCM's ``p_D``: ``s ~ U(0, 1)`` shifted ``k·s/(1 + (k − 1)·s)``, as the TrigFlow angle ``arctan(s/(1 − s))``."""
    s = torch.rand(n, generator=generator)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.atan2(s, 1 - s).clamp(lo, hi)


@OBJECTIVES.register("rcm")
class RCM:
    """rCM = sCM + DMD with a fake score.

    Args:
        config: the ``objective`` recipe block.
        teacher: the frozen VP or flow teacher (real score and ODE).
        student: full or LoRA; with a LoRA the fake score is a second adapter on the same base.
    """

    Config = RCMConfig
    bypasses_prepared = True  # the JVP calls the backbone itself: the trainer averages gradients

    def __init__(self, config: RCMConfig, teacher: Teacher, student: Student) -> None:
        check_teacher(teacher)
        self.config, self.teacher, self.student, self.schedule = config, teacher, student, teacher.schedule
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else teacher.guidance_scale
        kind = config.fake_score or ("lora" if student.is_lora else "full")
        rank = config.fake_lora_rank or (student.lora_config.r if student.lora_config is not None else 64)
        self.fake = fake_role(student, teacher, kind, rank, None)
        self.generator = student_role(student, shared_fake=kind == "lora")
        # sCM's adaptive weighting: trained by the student's optimizer, never exported (auxiliary())
        self.weighting = AdaptiveWeight() if config.adaptive_weighting else None
        self.pipeline_scheduler = pipeline_scheduler(teacher, config)

    # --- protocol -----------------------------------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.generator, "fake_score": self.fake}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        """As ``scm``: forwards go through the backbones themselves."""

    def auxiliary(self) -> dict[str, nn.Module]:
        """sCM's adaptive weighting ``w(u)``, trained by the student's optimizer (never sampled or exported)."""
        return {"student": self.weighting} if self.weighting is not None else {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        cfg = self.config
        if step < cfg.tangent_warmup_steps:
            return "student"
        return (
            "student"
            if (step - cfg.tangent_warmup_steps) % (cfg.critic_steps_per_student_step + 1) == 0
            else ("fake_score")
        )

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        cfg = self.config
        uncond = batch.uncond if batch.uncond is not None else self.teacher.uncond_like(batch.cond)
        if phase == "fake_score":
            return self.critic_loss(batch, uncond, step)
        if batch.x0 is None:
            raise ValueError("rCM's sCM term noises data: the batch needs `x0` (data.source: image_folder or digits).")
        x0 = batch.x0.float()
        u = sample_u(x0.shape[0], self.schedule, cfg.p_mean, cfg.p_std).to(x0.device)
        x = trig_noise(x0, u, torch.randn_like(x0))
        F_teacher = teacher_trig_velocity(self.teacher, x, u, batch.cond, uncond, self.guidance_scale)
        loss_scm, metrics = scm_update(self.student.denoiser, x, u, F_teacher, batch.cond, cfg, step,
                                       self.weighting)  # fmt: skip
        loss = cfg.scm_weight * loss_scm
        metrics = {f"scm/{k}": v for k, v in metrics.items()}
        if step >= cfg.tangent_warmup_steps and cfg.dmd_weight > 0:
            loss_dmd, dmd_metrics = self.dmd_loss(x0.shape, batch.cond, uncond, step)
            loss = loss + cfg.dmd_weight * loss_dmd
            metrics.update(dmd_metrics)
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)

    def on_step_end(self, step: int, phase: str) -> None:
        """Nothing: θ⁻ = sg(θ)."""

    def sampler(self) -> SCMSampler:
        return trigflow_sampler(self.student.denoiser, self.schedule, self.config, self.pipeline_scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4, 8)) -> SamplingSpec:
        return trigflow_sampling_spec(self.sampler(), self.teacher, self.guidance_scale, "rcm", steps)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""

    # --- pieces -------------------------------------------------------------------------------------------------

    def backsim_steps(self, step: int) -> int:
        """rCM: ``(student iteration % 4) + 1`` student steps of backward simulation."""
        cfg = self.config
        iteration = max(0, step - cfg.tangent_warmup_steps) // (cfg.critic_steps_per_student_step + 1)
        return iteration % cfg.max_backsim_steps + 1

    def simulate(self, shape: tuple[int, ...], cond: Conditioning, num_steps: int, grad: bool) -> Tensor:
        """The student's own ``num_steps``-step sample from pure noise; only the last step keeps the graph."""
        device = next(self.teacher.denoiser.parameters()).device
        if self.config.backsim_times == "random":
            lo, hi = u_range(self.schedule)
            top = self.sampler().angles(1, shape)[0]
            angles = backsim_angles(shape[0], num_steps, top, self.config.dmd_shift, max(lo, 1e-3), hi)
        else:
            angles = self.sampler().angles(num_steps, shape)[:, None].float().expand(num_steps, shape[0])
        angles = angles.to(device)
        x = torch.randn(shape, device=device)
        for i in range(num_steps):
            last = i + 1 == num_steps
            with contextlib.nullcontext() if (grad and last) else torch.no_grad():
                x0 = consistency_fn(trig_F(self.student.denoiser, x, angles[i], cond), x, angles[i])
            if not last:
                x = trig_noise(x0, angles[i + 1], torch.randn_like(x0))
        return x0

    def _fake_view(self) -> Any:
        """The fake score's denoiser and the context that makes it active."""
        if isinstance(self.fake, AdapterRole):
            return self.fake.denoiser, active_adapter(self.fake.denoiser.backbone, self.fake.adapter_name)
        return self.fake.denoiser, adapters_disabled(self.fake.denoiser.backbone)

    def _noised(self, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lo, hi = u_range(self.schedule)
        u = sample_u_dmd(G.shape[0], self.config.dmd_shift, max(lo, 1e-3), hi).to(G.device)
        eps = torch.randn_like(G)
        return bcast(torch.cos(u), G) * G.detach() + bcast(torch.sin(u), G) * eps, u, eps

    def dmd_loss(self, shape: tuple[int, ...], cond: Conditioning, uncond: Conditioning | None, step: int):
        """The DMD term on the student's backward-simulated sample (gradient injection)."""
        G = self.simulate(shape, cond, self.backsim_steps(step), grad=True)
        x_u, u, _ = self._noised(G)
        F_real = teacher_trig_velocity(self.teacher, x_u, u, cond, uncond, self.guidance_scale)
        x0_real = consistency_fn(F_real, x_u, u)
        denoiser, ctx = self._fake_view()
        with torch.no_grad(), ctx:
            x0_fake = consistency_fn(trig_F(denoiser, x_u, u, cond), x_u, u)
        g = dm_gradient(x0_fake, x0_real, G.detach())  # DMD Eq. 7 with rCM's clamp 1e-5
        loss = injected_loss(G, g)
        return loss, {"dmd/loss": float(loss.detach()), "dmd/g_abs": float(g.abs().mean())}

    def critic_loss(self, batch: Batch, uncond: Conditioning | None, step: int) -> LossOutput:
        """The fake score's TrigFlow F-regression on the student's samples: ``‖G − x̂0_fake‖²/sin²u``."""
        shape = self._sample_shape(batch)
        G = self.simulate(shape, batch.cond, self.backsim_steps(step), grad=False)
        x_u, u, eps = self._noised(G)
        denoiser, ctx = self._fake_view()
        with ctx:
            F_fake = trig_F(denoiser, x_u, u, batch.cond)
        c, s = bcast(torch.cos(u), F_fake), bcast(torch.sin(u), F_fake)
        x0_pred, eps_pred = c * x_u - s * F_fake, s * x_u + c * F_fake
        loss = denoising_loss(x0_pred, eps_pred, G, eps, torch.cos(u), torch.sin(u), "trigflow")
        return LossOutput(loss, {"loss": float(loss.detach()), "critic/loss": float(loss.detach())})

    def _sample_shape(self, batch: Batch) -> tuple[int, ...]:
        if batch.x0 is not None:
            return tuple(batch.x0.shape)
        from fewstep.models.backbones import latent_shape

        return tuple(latent_shape(self.teacher, batch.batch_size or 1))
