"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2024, arXiv 2410.11081).

The reference for the loss as implemented is rCM's code (NVlabs/rcm, ``sCM`` mode). One training step:

1. ``u`` from the lognormal proposal ``tan u = e^τ``, ``τ ~ N(P_mean, P_std²)`` and ``x_u = cos u·x0 + sin u·z``;
2. the teacher's guided TrigFlow velocity ``F_T = dx_u/du`` (any VP or flow teacher through ``trigflow``);
3. the student's ``F_θ⁻(x_u, u)`` and ``cos u sin u·dF_θ⁻/du`` in one JVP along ``(cos u sin u·F_T, cos u sin u)``
   (sCM rearrangement), through the diffusers model with attention routed through ``fewstep.kernels``;
4. ``g = −cos²u·(F_θ⁻ − F_T) − r·cos u sin u·(x_u + dF_θ⁻/du)``, ``ĝ = g/(‖g‖ + c)`` (float64, per sample), the
   regression ``‖F_θ − sg(F_θ⁻ + ĝ)‖²`` with tangent warmup ``r`` (0 → 1) and adaptive weighting
   ``e^{−w(u)}·L/D + w(u)`` (Kendall-style, rCM's ``kendall_loss``).

``θ⁻ = sg(θ)`` (no EMA target, as sCM and rCM). ``scm_update`` is shared with TBCM (trajectory caches) and rCM.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.convert import bcast
from fewstep.noise.schedules import Schedule
from fewstep.noise.timesteps import lognormal_sigma
from fewstep.objectives.consistency.lcm import boundary_scalings
from fewstep.objectives.consistency.trigflow import (
    HALF_PI,
    consistency_fn,
    student_F_and_tangent,
    teacher_trig_velocity,
    trig_F,
    trig_noise,
    u_range,
    vp_index_from_u,
)
from fewstep.objectives.dmd.sampler import dmd_pipeline_scheduler, dmd_student_grid
from fewstep.objectives.pipeline_grid import pipeline_grid_spec, runs_own_grid
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, flow_renoise_spec, lcm_vp_spec
from fewstep.solvers.grids import lcm_timesteps, skipping_grid

VP_EXPORT_GRID = 50  # VP students are sampled at LCMScheduler's picks from a 50-step skipping grid (exportable)
DEFAULT_MID_U = [1.1, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05]  # flow/TrigFlow sampling angles after π/2 (sCM)


class SCMConfig(BaseModel):
    """Recipe block of the ``scm`` objective (defaults: sCM paper / rCM code).

    ``guidance_scale`` is the teacher's CFG ``w`` in the Imagen convention (w = 1 is off); ``None`` uses the
    recipe's ``teacher.guidance_scale``.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["scm"] = "scm"
    guidance_scale: float | None = Field(None, ge=0.0, description="teacher CFG w (Imagen); None: teacher's")
    p_mean: float = Field(-0.8, description="lognormal proposal: ln tan u ~ N(p_mean, p_std²)")
    p_std: float = Field(1.6, gt=0.0)
    tangent_warmup_steps: int = Field(10000, ge=0, description="r: linear 0 → 1 over these steps (0: r = 1)")
    tangent_norm_c: float = Field(0.1, gt=0.0, description="ĝ = g / (‖g‖ + c)")
    adaptive_weighting: bool = True
    tangent: Literal["jvp", "finite_difference"] = "jvp"
    fd_size: float = Field(1e-4, gt=0.0, description="finite-difference step (rCM fd_size)")
    jvp_primal_grad: bool = Field(False, description="backprop through the JVP's primal (one fewer forward)")
    mid_u: list[float] | None = Field(
        None, min_length=1,
        description=f"flow/TrigFlow teachers: the intermediate angles of multistep sampling (None: {DEFAULT_MID_U}); "
        "a pipeline without sigmas= (Wan, LTX) samples its exported scheduler's grid instead and takes none",
    )  # fmt: skip
    pipeline_steps: int = Field(
        4, ge=2, description="pipelines without sigmas= (Wan, LTX): the step count the exported scheduler is made for"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------------


def sample_u(n: int, schedule: Schedule, p_mean: float, p_std: float, generator: torch.Generator | None = None):
    """``u = arctan(e^τ)``, ``τ ~ N(p_mean, p_std²)`` (σ_d = 1), clamped to the angles the backbone knows, ``[n]``."""
    lo, hi = u_range(schedule)
    return (lognormal_sigma(n, generator, p_mean, p_std) * HALF_PI).clamp(lo, hi)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's tangent warmup ``r``: linear from 0 to 1 over ``warmup_steps``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_target(
    F_minus: Tensor, F_teacher: Tensor, dF_cs: Tensor, x: Tensor, u: Tensor, r: float, c: float = 0.1
) -> tuple[Tensor, Tensor]:
    """The sCM regression target ``F_θ⁻ + ĝ`` and ``‖g‖`` per sample (sCM Eq. 8 with σ_d = 1, rCM's normalisation).

    Args:
        F_minus: ``sg F_θ(x_u, u)`` ``[b, ...]``; F_teacher: the teacher's guided ``dx_u/du``.
        dF_cs: ``cos u·sin u·dF_θ⁻/du`` (total derivative along the teacher ODE) ``[b, ...]``.
        x, u: ``x_u`` and ``u`` ``[b]``; r: tangent warmup; c: the normalisation constant.
    """
    cos, sin = bcast(torch.cos(u.double()), x), bcast(torch.sin(u.double()), x)
    g = -(cos**2) * (F_minus.double() - F_teacher.double()) - r * (cos * sin * x.double() + dF_cs.double())
    norm = g.flatten(1).norm(dim=1)
    g_hat = g / bcast(norm + c, g)  # tangent normalisation
    return (F_minus.double() + g_hat).float(), norm.float()


class AdaptiveWeight(nn.Module):
    """``w(u)``: a log-variance MLP on low-frequency Fourier features of ``u`` (sCM's adaptive weighting).

    Starts at ``w = 0`` (zero-initialised output) so the first steps are the plain loss.
    """

    def __init__(self, num_freqs: int = 16, width: int = 64) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.net = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, u: Tensor) -> Tensor:
        freqs = torch.arange(1, self.num_freqs + 1, dtype=torch.float32, device=u.device)
        arg = u.float()[:, None] * freqs[None]
        return self.net(torch.cat([torch.cos(arg), torch.sin(arg)], 1))[:, 0]


def scm_update(
    denoiser: Denoiser,
    x: Tensor,
    u: Tensor,
    F_teacher: Tensor,
    cond: Conditioning,
    config: SCMConfig,
    step: int,
    weighting: nn.Module | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One sCM loss on ``(x_u, u, F_T)``: the JVP target and the regression with the student's gradient.

    Returns ``(loss, metrics)``; the loss backpropagates into ``denoiser`` (and ``weighting``).
    """
    cs = torch.cos(u.float()) * torch.sin(u.float())  # JVP rearrangement (sCM)
    dx = bcast(cs, x) * F_teacher
    if config.jvp_primal_grad and config.tangent == "jvp":
        F_theta, dF_cs = student_F_and_tangent(denoiser, x, u, cond, dx, cs, with_grad=True)
        F_minus = F_theta.detach()
    else:
        F_minus, dF_cs = student_F_and_tangent(denoiser, x, u, cond, dx, cs, config.tangent, config.fd_size)
        F_theta = trig_F(denoiser, x, u, cond)
    r = tangent_warmup(step, config.tangent_warmup_steps)
    target, g_norm = scm_target(F_minus, F_teacher, dF_cs, x, u, r, config.tangent_norm_c)
    per_sample = ((F_theta - target) ** 2).flatten(1).mean(1)  # L_t / D
    finite = torch.isfinite(per_sample)  # NaN masking per sample (rCM)
    raw = per_sample.detach()
    if weighting is not None:
        logvar = weighting(u)
        per_sample = torch.exp(-logvar) * per_sample + logvar
    loss = torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum() / finite.sum().clamp(min=1)
    metrics = {"loss": float(loss.detach()), "scm_mse": float(raw[finite].mean()) if finite.any() else math.nan,
               "g_norm": float(g_norm.mean()), "tangent_r": r}  # fmt: skip
    return loss, metrics


def pipeline_scheduler(teacher: Teacher, config: SCMConfig) -> dict[str, Any] | None:
    """The exported scheduler of a continuous-time student whose text pipeline takes no ``sigmas=`` (Wan, LTX), whose
    own grid the student then samples (``dmd_pipeline_scheduler``: at ``config.pipeline_steps`` steps, DMD's
    ``shift(1 − i/K)`` on the teacher's shift); ``None`` where the pipeline takes ``sigmas=`` or is a pixel pipeline
    (``DDPMPipeline``: its export writes the sampling loop out, at any levels), and the student samples ``mid_u``.

    Raises:
        ValueError: ``mid_u`` is set for such a pipeline, which cannot be given those angles.
    """
    scheduler = dmd_pipeline_scheduler(teacher, config.pipeline_steps) if runs_own_grid(teacher.pipeline) else None
    if scheduler is not None and config.mid_u is not None:
        raise ValueError(
            f"objective.mid_u={config.mid_u}: {type(teacher.pipeline).__name__} takes no sigmas=, so a student cannot "
            "be sampled there at chosen angles. Remove mid_u: the student samples the exported scheduler's own grid "
            f"(objective.pipeline_steps sets the step count it is made for, now {config.pipeline_steps})."
        )
    return scheduler


def check_teacher(teacher: Teacher) -> None:
    if teacher.schedule.kind not in ("vp", "flow", "trigflow"):
        raise ValueError(
            f"sCM wraps VP, flow and TrigFlow teachers in TrigFlow coordinates; got a {teacher.schedule.kind!r} "
            "schedule."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SCMSampler:
    """sCM multistep sampling: ``x̂0 = cos u·x − sin u·F_θ(x, u)``, then re-noise
    ``x ← cos u'·x̂0 + sin u'·z``. Flow/TrigFlow students start at ``u = π/2`` (x = noise) and visit ``mid_u``
    (``None``: ``DEFAULT_MID_U``); VP students visit LCMScheduler's picks from a 50-step skipping grid (so a stock
    ``LCMScheduler`` reproduces them); students of a pipeline without ``sigmas=`` visit the levels its exported
    scheduler ``pipeline_scheduler`` runs there (``dmd_student_grid``; made for ``pipeline_steps`` steps).
    """

    denoiser: Denoiser
    schedule: Schedule
    mid_u: list[float] | None
    pipeline_scheduler: dict[str, Any] | None = None
    pipeline_steps: int = 4

    def angles(self, num_steps: int, shape: tuple[int, ...] = ()) -> Tensor:
        """The ``num_steps`` TrigFlow angles visited (descending); ``shape``: the latents', for a grid that shifts
        by the token count (LTX)."""
        if self.schedule.kind == "vp":
            taus = lcm_timesteps(skipping_grid(self.schedule, VP_EXPORT_GRID), num_steps)
            return torch.atan2(self.schedule.sigma(taus), self.schedule.alpha(taus))
        if self.pipeline_scheduler is not None:  # flow level s ↔ angle arctan(s / (1 − s))
            ntok = num_tokens(self.denoiser, shape)
            levels = dmd_student_grid(self.schedule, num_steps, ntok, self.pipeline_scheduler)
            return torch.atan2(levels, 1 - levels)
        mid_u = self.mid_u if self.mid_u is not None else DEFAULT_MID_U
        if num_steps - 1 > len(mid_u):
            raise ValueError(f"num_steps={num_steps}: objective.mid_u has {len(mid_u)} intermediate angles.")
        return torch.tensor([HALF_PI, *mid_u[: num_steps - 1]], dtype=torch.float32)

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        angles = self.angles(num_steps, tuple(noise.shape)).to(noise.device)
        x, x0 = noise.float(), noise.float()
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                for i in range(num_steps):
                    u = angles[i].expand(x.shape[0])
                    x0 = self._x0(x, u, cond)
                    if i + 1 < num_steps:
                        z = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                        x = trig_noise(x0, angles[i + 1], z)
        finally:
            self.denoiser.train(was_training)
        return x0

    def _x0(self, x: Tensor, u: Tensor, cond: Conditioning) -> Tensor:
        if self.schedule.kind != "vp":
            return consistency_fn(trig_F(self.denoiser, x, u, cond), x, u)
        # VP: the exact training index, as LCMScheduler feeds it, with its (negligible) boundary blend
        tau = self.schedule.tau_from_model_timestep(self.schedule.model_timestep(_vp_tau(self.schedule, u)))
        c_skip, c_out = boundary_scalings(self.schedule.model_timestep(tau))
        x0 = self.denoiser(x, tau.to(x.device), cond).x0
        return bcast(c_skip, x0) * x.float() + bcast(c_out, x0) * x0


def _vp_tau(schedule: Schedule, u: Tensor) -> Tensor:
    """The VP level of the training index nearest to angle ``u``."""
    return schedule.tau_from_model_timestep(vp_index_from_u(schedule, u).round())


# ---------------------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("scm")
class SCM:
    """Continuous-time consistency distillation of a VP, flow or TrigFlow teacher.

    Args:
        config: the ``objective`` recipe block.
        teacher: the frozen teacher; its guided velocity is the ODE the student is made consistent along.
        student: a full or LoRA student. With ``adaptive_weighting`` the weighting MLP is its ``auxiliary()``
            module (trained by the student's optimizer, checkpointed, never exported).
    """

    Config = SCMConfig
    bypasses_prepared = True  # the JVP calls the backbone itself: the trainer averages gradients

    def __init__(self, config: SCMConfig, teacher: Teacher, student: Student) -> None:
        check_teacher(teacher)
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        self.weighting = AdaptiveWeight() if config.adaptive_weighting else None
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else teacher.guidance_scale
        self.pipeline_scheduler = pipeline_scheduler(teacher, config)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        """The JVP and the student's forward go through the backbone itself (see docs/consistency.md)."""

    def auxiliary(self) -> dict[str, nn.Module]:
        """sCM's adaptive weighting ``w(u)``, trained by the student's optimizer (never sampled or exported)."""
        return {"student": self.weighting} if self.weighting is not None else {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        return "student"

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """sCM on data: ``x_u = cos u·x0 + sin u·z`` with the teacher's guided velocity at ``(x_u, u)``."""
        if batch.x0 is None:
            raise ValueError(
                "sCM noises data: the batch needs `x0`. Use data.source: image_folder (or digits), or train on "
                "teacher trajectories with the data-free `tbcm` objective."
            )
        x0 = batch.x0.float()
        u = sample_u(x0.shape[0], self.schedule, self.config.p_mean, self.config.p_std).to(x0.device)
        x = trig_noise(x0, u, torch.randn_like(x0))
        F_teacher = teacher_trig_velocity(self.teacher, x, u, batch.cond, batch.uncond, self.guidance_scale)
        loss, metrics = scm_update(self.student.denoiser, x, u, F_teacher, batch.cond, self.config, step,
                                   self.weighting)  # fmt: skip
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
        return trigflow_sampling_spec(self.sampler(), self.teacher, self.guidance_scale, "scm", steps)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""


def trigflow_sampler(
    denoiser: Denoiser, schedule: Schedule, config: SCMConfig, pipeline_scheduler: dict[str, Any] | None
) -> SCMSampler:
    """The ``SCMSampler`` of a continuous-time student (sCM, rCM, TBCM) from its recipe block."""
    return SCMSampler(denoiser, schedule, config.mid_u, pipeline_scheduler, config.pipeline_steps)


def trigflow_sampling_spec(
    sampler: SCMSampler, teacher: Teacher, guidance_scale: float, name: str, steps: tuple[int, ...]
) -> SamplingSpec:
    """The ``SamplingSpec`` of an ``SCMSampler`` student (sCM, rCM, TBCM; ``name``): ``LCMScheduler`` (VP) or
    ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` with the trained sigmas (flow). ``guidance_scale``:
    the teacher's CFG ``w`` in training, for the card. A pipeline without ``sigmas=`` (Wan, LTX) gets its exported
    scheduler, whose own grid is the student's (``pipeline_grid_spec``)."""
    schedule = sampler.schedule
    if sampler.pipeline_scheduler is not None:
        note = f"trained with teacher CFG w = {guidance_scale}"
        return pipeline_grid_spec(sampler.pipeline_scheduler, schedule, steps, sampler.pipeline_steps, name, note)
    common = dict(
        objective=name,
        recommended_steps=2,
        guidance_scale=1.0,
        guidance_convention=f"{GUIDANCE_CONVENTION}; trained with teacher CFG w = {guidance_scale}",
    )
    if schedule.kind == "vp":
        timesteps = {s: schedule.model_timestep(_vp_tau(schedule, sampler.angles(s))).long().tolist() for s in steps}
        return lcm_vp_spec(teacher, timesteps, VP_EXPORT_GRID, 10.0, **common)
    if schedule.kind != "flow":
        raise ValueError(f"Export of TrigFlow students needs a VP or flow teacher, not a {schedule.kind!r} schedule.")
    steps = tuple(s for s in steps if s - 1 <= len(sampler.mid_u or DEFAULT_MID_U))
    levels = {s: (torch.sin(a) / (torch.sin(a) + torch.cos(a))).clamp(0, 1) for s in steps for a in [sampler.angles(s)]}
    if schedule.use_dynamic_shifting:  # angles do not depend on the resolution: export them unshifted (Flux, Qwen)
        sigmas = {s: lv.tolist() for s, lv in levels.items()}
        return flow_renoise_spec(teacher, sigmas, sigmas, 0.0, unshifted=True, **common)
    k = schedule.shift_factor  # invert s' = k·s / (1 + (k − 1)·s)
    sigmas = {s: (lv / (k - (k - 1) * lv)).tolist() for s, lv in levels.items()}
    return flow_renoise_spec(teacher, sigmas, {s: lv.tolist() for s, lv in levels.items()}, 0.0, **common)
