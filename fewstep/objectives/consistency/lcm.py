"""LCM and LCM-LoRA: latent consistency distillation.

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378) and "LCM-LoRA" (arXiv 2311.05556); the reference
is diffusers' ``examples/consistency_distillation/train_lcm_distill{,_lora}_sd_wds.py``. One training step:

1. draw an interval ``(τ_{n+k}, τ_n)`` of the skipping-step grid and ``x_{τ_{n+k}} = α·x0 + σ·ε``;
2. the student's consistency function ``f_θ(x, τ) = c_skip(t)·x + c_out(t)·x̂0_θ(x, τ)`` at ``τ_{n+k}``;
3. the teacher's guided ``(x̂0, ε̂)`` (CFG in ω form, ω ~ U[w_min, w_max]) and one DDIM step to ``τ_n``
   (for a flow teacher the same formula is the Euler step);
4. the target ``f_θ⁻(x_{τ_n}, τ_n)``: an EMA copy of a full student (LCM) or the LoRA student itself under
   ``no_grad`` (LCM-LoRA), and an L2 or pseudo-Huber distance between the two.

Skipping grid: for a VP teacher the diffusers DDIM solver grid on the teacher's own integer timesteps,
``t = (i+1)·k − 1`` with ``k = N_train // num_ddim_timesteps`` and ``t_n = max(t_{n+k} − k, 0)``; for a flow teacher
the same number of intervals on ``τ = s``, uniform before the teacher's static shift: ``τ_j = shift(j / N)``.
The boundary scalings use the integer timestep (VP) or ``1000·s`` (flow), so ``f(x, τ_min) = x`` exactly.

Pipelines that take no ``sigmas=`` (``WanPipeline``, ``LTXPipeline``) run their scheduler's own grid. LCM's ``K``-step
levels ``shift(1 − i/K)`` (``K`` dividing the grid's ``N``) are such a grid: the student is exported with the
re-noising scheduler whose ``num_inference_steps=K`` runs them (``lcm_pipeline_scheduler``), and at every other step
count fewstep samples the levels that scheduler runs there. LTX shifts by the video's token count, so its skipping grid
is shifted by the token count of each batch, as the pipeline shifts its levels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from fewstep.models.backbones import num_tokens, renoise_layout
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser, eval_mode
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.convert import bcast
from fewstep.noise.schedules import Schedule
from fewstep.objectives.dmd.sampler import dmd_pipeline_scheduler, dmd_student_grid
from fewstep.objectives.losses import pseudo_huber
from fewstep.objectives.pipeline_grid import pipeline_grid_spec, runs_own_grid, takes_sigmas
from fewstep.objectives.protocol import OBJECTIVES, BackboneUse, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, flow_renoise_spec, lcm_vp_spec
from fewstep.solvers.grids import lcm_timesteps, skipping_grid
from fewstep.solvers.samplers import sample_consistency
from fewstep.solvers.steps import ddim_step, noise_to

FLOW_BOUNDARY_TIMESTEPS = 1000.0  # flow teachers: the boundary scalings see 1000·s (SD3's model timestep)


class LCMConfig(BaseModel):
    """Recipe block of the ``lcm`` objective (defaults: diffusers' LCM / LCM-LoRA scripts).

    Guidance convention: ``w_min`` and ``w_max`` are **ω in LCM's convention**, ``ŷ = (1 + ω)·ŷ_c − ω·ŷ_∅``, as in
    the diffusers scripts (whose code uses ω despite their help text). ω = w − 1 where w is the Imagen/diffusers
    ``guidance_scale`` (w = 1 is no guidance): the default ω ∈ [5, 15] is w ∈ [6, 16]. ``w_min = w_max = 0`` turns the
    teacher's CFG off (needed for unconditional teachers).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["lcm"] = "lcm"
    num_ddim_timesteps: int = Field(50, ge=1, description="intervals of the skipping-step grid (LCM's DDIM steps)")
    w_min: float = Field(5.0, ge=0.0, description="lowest ω (LCM convention, ω = w − 1) of the teacher's CFG")
    w_max: float = Field(15.0, ge=0.0, description="highest ω (LCM convention, ω = w − 1) of the teacher's CFG")
    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = Field(0.001, gt=0.0, description="pseudo-Huber c: mean(sqrt((a − b)² + c²) − c)")
    ema_target: bool | None = Field(None, description="EMA target net; None: True for a full student, False for LoRA")
    target_ema_decay: float = Field(0.95, ge=0.0, le=1.0)
    guidance_embedding: bool = Field(False, description="full LCM: feed ω to the UNet through `timestep_cond`")
    guidance_embedding_dim: int = Field(256, ge=2, description="`time_cond_proj_dim` added when the UNet lacks one")
    timestep_scaling: float = Field(10.0, gt=0.0, description="c_skip/c_out scale on the timestep (LCMScheduler)")
    sigma_data: float = Field(0.5, gt=0.0)

    @model_validator(mode="after")
    def _check_range(self) -> LCMConfig:
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min}); both are ω = w − 1.")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Pure pieces: boundary scalings, ω-embedding (the skipping grid is in fewstep.solvers.grids)
# ---------------------------------------------------------------------------------------------------------------------


def boundary_timestep(schedule: Schedule, tau: Tensor) -> Tensor:
    """The timestep ``t`` the boundary scalings see: the integer index (VP) or ``1000·s`` (flow)."""
    if schedule.kind == "vp":
        return schedule.model_timestep(tau)
    return torch.as_tensor(tau, dtype=torch.float32) * FLOW_BOUNDARY_TIMESTEPS


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's discrete boundary scalings (``LCMScheduler.get_scalings_for_boundary_condition_discrete``).

    ``c_skip = σ_d² / ((s·t)² + σ_d²)``, ``c_out = s·t / sqrt((s·t)² + σ_d²)``: ``c_skip(0) = 1``, ``c_out(0) = 0``.
    """
    scaled = timestep_scaling * torch.as_tensor(t, dtype=torch.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_scalings(schedule: Schedule, config: LCMConfig, tau: Tensor) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` at levels ``τ`` for this schedule and config."""
    return boundary_scalings(boundary_timestep(schedule, tau), config.sigma_data, config.timestep_scaling)


def guidance_scale_embedding(omega: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``1000·ω``, ``[b] -> [b, dim]`` (the LCM pipelines' ``get_guidance_scale_embedding``)."""
    w = omega.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def _check_teacher(teacher: Teacher) -> None:
    kind = teacher.schedule.kind
    if kind not in ("vp", "flow"):
        raise ValueError(
            f"LCM needs a VP (DDPM/DDIM) or flow-matching teacher; got a {kind!r} schedule. LCM's skipping-step "
            "grid and boundary scalings are defined on a discrete VP grid or on flow time s. For TrigFlow/EDM "
            "teachers use a continuous-time consistency objective (`scm` or `rcm`)."
        )
    config = getattr(teacher.denoiser.backbone, "config", None) or {}
    if config.get("guidance_embeds", False):
        raise ValueError(
            "This teacher takes guidance as an input embedding (guidance-distilled, e.g. FLUX.1-dev): LCM applies "
            "classifier-free guidance to the teacher in ω form, which such a model does not support. Distill it "
            "with an objective that treats the teacher as already guided (e.g. `dmd`)."
        )
    if kind == "flow" and teacher.schedule.use_dynamic_shifting and takes_sigmas(teacher.pipeline):
        raise ValueError(
            "This flow teacher uses resolution-dependent (dynamic) shifting and its pipeline takes the student's "
            "sigmas=, which LCM exports as one fixed set of levels. Use a teacher scheduler with a static `shift` "
            "(use_dynamic_shifting=False)."
        )


def recommended_steps(config: LCMConfig) -> int:
    """The step count LCM students are exported for: 4 (LCM's default), at most the grid's intervals."""
    return min(4, config.num_ddim_timesteps)


def lcm_pipeline_scheduler(teacher: Teacher, config: LCMConfig) -> dict[str, Any] | None:
    """The exported re-noising scheduler of an LCM student whose text pipeline takes no ``sigmas=`` (``None`` for the
    others, and for pixel pipelines such as ``DDPMPipeline``, whose export writes the sampling loop out): at
    ``num_inference_steps=K`` (``recommended_steps``) it runs ``shift(1 − i/K)`` (``dmd_pipeline_scheduler``), which
    are the levels ``LCMScheduler`` picks from the skipping grid when ``K`` divides its ``N`` intervals.

    Raises:
        ValueError: ``K`` does not divide ``num_ddim_timesteps`` (the pipeline could not run the trained levels).
    """
    if teacher.schedule.kind != "flow" or not runs_own_grid(teacher.pipeline):
        return None
    n, k = config.num_ddim_timesteps, recommended_steps(config)
    if n % k:
        raise ValueError(
            f"objective.num_ddim_timesteps={n}: {type(teacher.pipeline).__name__} takes no sigmas=, so the student "
            f"is exported with a scheduler whose own {k}-step grid must be {k} levels of the skipping grid, which "
            f"needs {k} to divide the grid's intervals. Use a multiple of {k} (48 also divides 1, 2, 4 and 8 steps)."
        )
    return dmd_pipeline_scheduler(teacher, k)


def add_guidance_embedding(backbone: nn.Module, dim: int) -> nn.Module:
    """A UNet2DConditionModel with ``time_cond_proj_dim`` (LCM's ω-embedding); the new ``cond_proj`` starts at zero,
    so the student starts as the teacher for every ω."""
    config = getattr(backbone, "config", None) or {}
    if "time_cond_proj_dim" not in config:
        raise ValueError(
            f"guidance_embedding=True needs a backbone that takes `timestep_cond` (a diffusers "
            f"UNet2DConditionModel); got {type(backbone).__name__}. Set objective.guidance_embedding=false "
            "(LCM-LoRA style: the guidance is baked in and sampled with guidance_scale≈1)."
        )
    if config["time_cond_proj_dim"] is not None:
        return backbone
    param = next(backbone.parameters())
    new = type(backbone).from_config(backbone.config, time_cond_proj_dim=dim)
    missing, unexpected = new.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise RuntimeError(f"Adding the ω-embedding changed more than cond_proj: {missing=}, {unexpected=}")
    nn.init.zeros_(new.time_embedding.cond_proj.weight)
    if getattr(backbone, "is_gradient_checkpointing", False):
        new.enable_gradient_checkpointing()
    if param.dtype != torch.float32:
        new.to(dtype=param.dtype)
    return new.to(param.device).train().requires_grad_(True)


def _consistency_fn(
    denoiser: nn.Module, schedule: Schedule, config: LCMConfig, x: Tensor, tau: Tensor, cond: Conditioning
) -> Tensor:
    """``f(x, τ) = c_skip(t)·x + c_out(t)·x̂0(x, τ)`` (LCM Eq. 9 with the discrete scalings)."""
    c_skip, c_out = lcm_scalings(schedule, config, tau)
    x0 = denoiser(x, tau, cond).x0
    return bcast(c_skip, x0) * x.float() + bcast(c_out, x0) * x0


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LCMSampler:
    """The LCM multistep sampler (``LCMScheduler``): at each picked level ``x̂0 = f_θ(x, τ)``, then
    re-noise to the next level with fresh noise; the last ``f_θ`` is the sample.

    ``guidance_scale`` is the Imagen/diffusers ``w``: a student with the ω-embedding is fed ``ω = w − 1`` (as the
    diffusers pipelines do); any other student gets real CFG on its own outputs when ``w != 1`` (needs the
    teacher's null conditioning), which is what ``pipe(..., guidance_scale=w)`` does with a LoRA student.
    """

    denoiser: Denoiser
    schedule: Schedule
    config: LCMConfig
    grid: Tensor | None  # None: a dynamically shifted teacher, whose grid follows the token count
    guidance_scale: float = 1.0
    uncond_like: Any = None  # cond -> null Conditioning (Teacher.uncond_like)
    pipeline_scheduler: dict[str, Any] | None = None  # a sigma-less pipeline's exported scheduler

    def timesteps(self, num_steps: int, shape: tuple[int, ...] = ()) -> Tensor:
        """The ``num_steps`` τ levels the sampler visits (descending), as ``LCMScheduler.set_timesteps``, or, for a
        pipeline without ``sigmas=``, as its exported scheduler runs them for latents of ``shape``."""
        if self.pipeline_scheduler is not None:
            ntok = num_tokens(self.denoiser, shape)
            return dmd_student_grid(self.schedule, num_steps, ntok, self.pipeline_scheduler)
        return lcm_timesteps(self.grid, num_steps)

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        if not 1 <= num_steps <= self.config.num_ddim_timesteps:
            raise ValueError(
                f"num_steps={num_steps} is not in [1, {self.config.num_ddim_timesteps}]: the LCM sampler visits levels "
                "of the skipping grid it was trained on (objective.num_ddim_timesteps)."
            )
        taus = self.timesteps(num_steps, tuple(noise.shape)).to(noise.device)
        with torch.no_grad(), eval_mode(self.denoiser):
            layout = renoise_layout(self.denoiser)  # CogVideoX's scheduler draws frames first
            return sample_consistency(self._predict(cond), self.schedule, noise, taus, generator, layout)

    def _predict(self, cond: Conditioning) -> Any:
        w = float(self.guidance_scale)
        if w != 1.0 and not self.config.guidance_embedding and self.uncond_like is None:
            raise ValueError(f"guidance_scale={w} needs a null conditioning; this teacher has none. Use 1.0.")

        def predict(x: Tensor, tau: Tensor):
            c_skip, c_out = lcm_scalings(self.schedule, self.config, tau)
            if self.config.guidance_embedding:  # ω = w − 1 through timestep_cond, as the diffusers pipelines
                dim = self.denoiser.backbone.config.time_cond_proj_dim
                emb = guidance_scale_embedding(torch.full((x.shape[0],), w - 1.0, device=x.device), dim)
                pred = self.denoiser(x, tau, cond.replace(timestep_cond=emb.to(self.denoiser.dtype)).to(x.device))
            elif w == 1.0:
                pred = self.denoiser(x, tau, cond.to(x.device))
            else:  # real CFG on the student, Imagen convention, on raw outputs
                raw = self.denoiser.raw(
                    torch.cat([x, x]),
                    torch.cat([tau, tau]),
                    Conditioning.cat([self.uncond_like(cond), cond]).to(x.device),
                )
                out_u, out_c = raw.float().chunk(2)
                pred = self.denoiser.to_prediction(out_u + w * (out_c - out_u), x.float(), tau)
            pred.x0 = bcast(c_skip, pred.x0) * x.float() + bcast(c_out, pred.x0) * pred.x0
            return pred

        return predict


# ---------------------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("lcm")
class LCM:
    """Latent consistency distillation of a VP or flow teacher (LCM, Luo et al. 2023; LCM-LoRA).

    Args:
        config: the ``objective`` recipe block.
        teacher: the frozen teacher (VP or flow schedule).
        student: a full student (LCM: EMA target, optional ω-embedding) or a LoRA student (LCM-LoRA: the target is
            the same LoRA'd network under ``no_grad``).
    """

    Config = LCMConfig
    bypasses_prepared = False

    def __init__(self, config: LCMConfig, teacher: Teacher, student: Student) -> None:
        _check_teacher(teacher)
        self.config = config
        self.teacher = teacher
        self.student = student
        self.schedule = teacher.schedule
        if config.guidance_embedding:
            if student.is_lora:
                raise ValueError(
                    "objective.guidance_embedding=true needs a full student (student.kind: full): the ω-embedding "
                    "adds a `cond_proj` layer to the UNet that a LoRA cannot carry. For LCM-LoRA keep "
                    "guidance_embedding=false (the guidance is baked in)."
                )
            student.denoiser.backbone = add_guidance_embedding(student.denoiser.backbone, config.guidance_embedding_dim)
        self.pipeline_scheduler = lcm_pipeline_scheduler(teacher, config)
        dynamic = getattr(self.schedule, "use_dynamic_shifting", False)
        # [N + 1] ascending τ; None: shifted by each batch's token count (grid_for)
        self.grid = None if dynamic else skipping_grid(self.schedule, config.num_ddim_timesteps)
        use_ema = config.ema_target if config.ema_target is not None else not student.is_lora
        # θ⁻: an EMA copy (LCM) or None = the online student itself under no_grad (LCM-LoRA)
        self.target: Denoiser | None = copy.deepcopy(student.denoiser).requires_grad_(False) if use_ema else None
        self._online: nn.Module = student

    # --- protocol -----------------------------------------------------------------------------------------------

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

    def backbone_use(self) -> dict[str, BackboneUse]:
        """For ``fewstep plan``: the student's forward kept for backward while the teacher takes its guided step on
        ``[uncond, cond]`` (twice the batch, unless ω is always 0) and the target its plain one."""
        return {"student": BackboneUse(graphs=1.0, no_grad_batch=1.0 if self.config.w_max == 0 else 2.0)}

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """LCM loss ``d(f_θ(x_{τ_{n+k}}, τ_{n+k}), f_θ⁻(x̂_{τ_n}, τ_n))`` for one batch of data ``x0``."""
        if batch.x0 is None:
            raise ValueError(
                "LCM distils along the teacher's ODE from noised data: the batch needs `x0` (latents or pixels). "
                "Use data.source: image_folder (or digits), not a prompts-only source."
            )
        x0 = batch.x0
        b, cfg = x0.shape[0], self.config
        idx = torch.randint(0, cfg.num_ddim_timesteps, (b,))
        grid = self.grid_for(tuple(x0.shape))
        tau_start, tau_end = grid[idx + 1].to(x0.device), grid[idx].to(x0.device)  # τ_{n+k}, τ_n
        x_start = noise_to(self.schedule, x0, torch.randn_like(x0), tau_start)
        omega = self.sample_omega(b).to(x0.device)
        cond = self.student_cond(batch.cond, omega)

        model_pred = _consistency_fn(self._online, self.schedule, cfg, x_start, tau_start, cond)
        with torch.no_grad():
            x_end = self.teacher_step(x_start, tau_start, tau_end, batch.cond, batch.uncond, omega)
            target_net = self.target if self.target is not None else self.student.denoiser
            target = _consistency_fn(target_net, self.schedule, cfg, x_end, tau_end, cond)

        if cfg.loss_type == "l2":
            loss = F.mse_loss(model_pred.float(), target.float())
        else:  # pseudo-Huber, elementwise as in the diffusers scripts
            loss = pseudo_huber(model_pred, target, cfg.huber_c).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "omega": float(omega.mean())})

    def on_step_end(self, step: int, phase: str) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ (LCM's EMA target, μ = target_ema_decay); nothing for LCM-LoRA."""
        if self.target is None:
            return
        with torch.no_grad():
            for p_t, p in zip(self.target.parameters(), self.student.denoiser.parameters()):
                if p.requires_grad:
                    whole = p.full_tensor() if hasattr(p, "full_tensor") else p  # a sharded (FSDP) student's weight
                    p_t.lerp_(whole.detach().to(p_t.dtype), 1.0 - self.config.target_ema_decay)

    def sampler(self) -> LCMSampler:
        return LCMSampler(
            self.student.denoiser,
            self.schedule,
            self.config,
            self.grid,
            guidance_scale=self.recommended_guidance_scale(),
            uncond_like=self.teacher.uncond_like if self.teacher.null_cond is not None else None,
            pipeline_scheduler=self.pipeline_scheduler,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is None:
            return
        if "target" not in state:
            raise ValueError(
                "This LCM objective keeps an EMA target but the state has none (keys: "
                f"{sorted(state)}). Resume with the same objective.ema_target setting."
            )
        self.target.load_state_dict(state["target"])

    # --- pieces (public for tests and export) ------------------------------------------------------------------

    def sample_omega(self, n: int) -> Tensor:
        """ω ~ U[w_min, w_max] (LCM convention, ω = w − 1), ``[n]``."""
        return self.config.w_min + (self.config.w_max - self.config.w_min) * torch.rand(n)

    def student_cond(self, cond: Conditioning, omega: Tensor) -> Conditioning:
        """The student's conditioning: with the ω-embedding in ``timestep_cond`` for full LCM."""
        if not self.config.guidance_embedding:
            return cond
        dim = self.student.denoiser.backbone.config.time_cond_proj_dim
        return cond.replace(timestep_cond=guidance_scale_embedding(omega, dim).to(self.student.denoiser.dtype))

    def teacher_step(
        self,
        x: Tensor,
        tau_start: Tensor,
        tau_end: Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        omega: Tensor,
    ) -> Tensor:
        """One teacher DDIM step ``τ_{n+k} → τ_n`` (the Euler step for flow) with CFG in ω form on x̂0 and ε̂.

        ``(1 + ω)·ŷ_c − ω·ŷ_∅`` is the Imagen form with ``w = ω + 1``, applied once on raw outputs.
        """
        w: float | Tensor = 1.0 if self.config.w_max == 0 else omega + 1.0
        pred = self.teacher.predict(x, tau_start, cond, uncond, guidance_scale=w)
        return ddim_step(self.schedule, pred, tau_end)

    def grid_for(self, shape: tuple[int, ...]) -> Tensor:
        """The skipping grid for latents of ``shape``: the fixed one, or, for a dynamically shifted teacher, the one
        shifted by their token count."""
        if self.grid is not None:
            return self.grid
        return skipping_grid(self.schedule, self.config.num_ddim_timesteps, num_tokens(self.teacher.denoiser, shape))

    def consistency_fn(self, x: Tensor, tau: Tensor, cond: Conditioning) -> Tensor:
        """The student's ``f_θ(x, τ)`` (boundary scalings applied), without gradients."""
        with torch.no_grad():
            return _consistency_fn(self.student.denoiser, self.schedule, self.config, x, tau, cond)

    def recommended_guidance_scale(self) -> float:
        """Imagen ``w`` to sample with: 1 (CFG off, guidance baked in) unless the student embeds ω, then LCM's
        pipeline default 8.5 clamped to the trained range ``[1 + w_min, 1 + w_max]``."""
        if not self.config.guidance_embedding:
            return 1.0
        return min(max(8.5, 1.0 + self.config.w_min), 1.0 + self.config.w_max)

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4, 8)) -> SamplingSpec:
        """``LCMScheduler`` on the trained skipping grid (VP), the flow re-noise scheduler at its levels, or, for a
        pipeline without ``sigmas=``, that scheduler made to run the trained levels at ``recommended_steps``."""
        cfg, n = self.config, self.config.num_ddim_timesteps
        steps = tuple(s for s in steps if s <= n)
        note = f"trained with teacher CFG ω ∈ [{cfg.w_min}, {cfg.w_max}] (LCM convention ω = w − 1)"
        if self.pipeline_scheduler is not None:
            k = recommended_steps(cfg)
            return pipeline_grid_spec(self.pipeline_scheduler, self.schedule, steps, k, "lcm", note)
        common = dict(
            objective="lcm", recommended_steps=recommended_steps(cfg), guidance_scale=self.recommended_guidance_scale(),
            guidance_convention=f"{GUIDANCE_CONVENTION}; {note}",
        )  # fmt: skip
        if self.schedule.kind == "vp":
            timesteps = {s: self.schedule.model_timestep(lcm_timesteps(self.grid, s)).long().tolist() for s in steps}
            return lcm_vp_spec(self.teacher, timesteps, n, cfg.timestep_scaling, **common)
        unshifted = torch.arange(n + 1, dtype=torch.float32) / n  # sigmas before the scheduler's own shift
        levels = {s: lcm_timesteps(self.grid, s) for s in steps}
        c_skip = max(float(lcm_scalings(self.schedule, cfg, t)[0].max()) for t in levels.values())
        sigmas = {s: lcm_timesteps(unshifted, s).tolist() for s in steps}
        return flow_renoise_spec(self.teacher, sigmas, {s: t.tolist() for s, t in levels.items()}, c_skip, **common)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""
