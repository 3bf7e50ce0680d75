"""Phased DMD (arXiv 2510.27684): the student's K steps are split into SNR phases, one LoRA
expert per phase on the shared frozen base.

Phase ``k`` trains expert ``k`` (adapter ``default`` for the first, ``expert<k>`` after) to map the distribution at
its start level to the one at its end level ``s`` (``s = 0`` for the last phase), with all earlier experts frozen
(no grad) and one fresh fake-score adapter ``fake<k>`` per phase (re-initialised from the teacher). Diffusion
time is drawn from the whole remaining interval ``(s, 1)``. The fake score learns by score
matching *within the subinterval*: only ``x_s`` is known, and the target
``x0* = x_s/α_s − α_t σ_s²/(α_s² σ_{t|s})·ε`` is unbiased where "treat ``x_s`` as clean" is not.

The trainer's groups are ``expert<k>`` and ``fake<k>`` (one optimizer each; an optimizer that never steps holds no
state); ``phase(step)`` walks the phases in order (``phase_train_steps``), each with DMD2's TTUR cycle.

Wan 2.2 (``WanExperts``: ``transformer`` denoises timesteps at or above ``boundary_ratio · 1000``, ``transformer_2``
below) has its phases already: ``phase_boundaries: pipeline`` makes the pipeline's experts the two phases. Expert 0
is the student adapter ``default`` on ``transformer``, expert 1 the same adapter on ``transformer_2``; one ``fake``
adapter likewise gives each phase a fake score on its own expert. The student grid is the one the stock
``WanPipeline`` runs (it takes no ``sigmas=``): the exported scheduler's ``set_timesteps(K)``, its shift chosen so that
``steps_per_phase`` levels lie on each side of the switch (``expert_scheduler``); each phase's diffusion time stays
in its expert's range.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from fewstep.models.backbones import WAN_EXPERT_COMPONENTS, WanExperts, num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.convert import Prediction, bcast, from_x0_eps
from fewstep.objectives.dmd import functional as Fn
from fewstep.objectives.dmd.dmd2 import check_teacher, sample_levels
from fewstep.objectives.dmd.health import health_metrics
from fewstep.objectives.dmd.roles import FAKE_ADAPTER, STUDENT_ADAPTER, AdapterRole, active_adapter, add_adapter
from fewstep.objectives.dmd.sampler import dmd_pipeline_scheduler, dmd_sampling_spec, dmd_student_grid
from fewstep.objectives.pipeline_grid import bisect_shift
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, flow_scheduler_config
from fewstep.solvers.steps import ddim_step, noise_to, renoise_step, transition, transition_coeffs


class PhasedDMDConfig(BaseModel):
    """Recipe block of ``phased_dmd`` (defaults: Phased DMD App. C: 4 steps in 2 phases, TTUR 5, no GAN)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["phased_dmd"] = "phased_dmd"
    num_phases: int = Field(2, ge=1, description="experts (SNR phases)")
    phase_boundaries: Literal["auto", "uniform", "pipeline"] = Field(
        "auto", description="uniform: equal shares of the student grid; pipeline: Wan 2.2's two experts (its "
        "boundary_ratio) are the phases; auto: pipeline on a Wan 2.2 teacher, else uniform",
    )  # fmt: skip
    steps_per_phase: int = Field(2, ge=1, description="student steps inside each phase")
    phase_train_steps: list[int] = Field(default_factory=lambda: [3000, 3000], description="trainer steps per phase")
    real_guidance_scale: float = Field(3.5, ge=1.0, description="Imagen w on the teacher branch only")
    fake_steps_per_generator_step: int = Field(5, ge=1, description="TTUR (Phased DMD: 5)")
    min_step_percent: float = Field(0.02, ge=0.0, le=1.0, description="diffusion time: lower end above s")
    normalize: bool = Field(True, description="DMD2-style normaliser on the projected difference (a heuristic)")
    fake_weight_clamp: float = Field(10.0, gt=0, description="clamp of 1/σ²_{t|s} in the fake loss (Eq. 13)")
    fake_lora_rank: int | None = Field(None, ge=1)
    sync_seed: int = 0
    resolution: int | None = Field(None, ge=8)

    @model_validator(mode="after")
    def _phases(self) -> PhasedDMDConfig:
        if len(self.phase_train_steps) != self.num_phases:
            raise ValueError(
                f"phase_train_steps has {len(self.phase_train_steps)} entries for num_phases={self.num_phases}: give "
                "one trainer-step budget per phase, e.g. [3000, 3000]."
            )
        if self.phase_boundaries == "pipeline" and self.num_phases != 2:
            raise ValueError(PIPELINE_PHASES.format(n=self.num_phases))
        return self


PIPELINE_PHASES = (
    "objective.num_phases={n}, but phase_boundaries from the pipeline means one phase per Wan 2.2 expert "
    "(transformer at or above boundary_ratio, transformer_2 below): set num_phases: 2 (and two phase_train_steps)."
)


def expert_name(k: int) -> str:
    return STUDENT_ADAPTER if k == 0 else f"expert{k}"


def phases_are_experts(teacher: Teacher, config: PhasedDMDConfig) -> bool:
    """Whether the phases are Wan 2.2's two experts (``phase_boundaries`` resolved against the teacher).

    Raises:
        ValueError: ``pipeline`` on a teacher with one backbone, ``uniform`` on Wan 2.2 (a phase would straddle the
            expert switch, and no single pipeline component could load its expert), or not 2 phases on Wan 2.2.
    """
    experts = isinstance(teacher.denoiser.backbone, WanExperts)
    mode = config.phase_boundaries
    if mode == "pipeline" and not experts:
        raise ValueError(
            f"objective.phase_boundaries: pipeline takes the phases from Wan 2.2's two experts (its boundary_ratio); "
            f"this teacher ({teacher.family}) has one backbone. Use phase_boundaries: uniform (or auto)."
        )
    if mode == "uniform" and experts:
        raise ValueError(
            "objective.phase_boundaries: uniform on a Wan 2.2 teacher would let a phase straddle the switch between "
            "its experts (transformer / transformer_2): use phase_boundaries: pipeline (or auto), one phase per expert."
        )
    if experts and config.num_phases != 2:
        raise ValueError(PIPELINE_PHASES.format(n=config.num_phases))
    return experts


def expert_edges(teacher: Teacher) -> tuple[float, float]:
    """The lowest level Wan 2.2's high-noise expert denoises and the highest its low-noise one does: the neighbouring
    float32 levels around ``boundary_timestep``, split by the same ``timestep ≥ boundary`` test as ``WanPipeline``."""
    schedule, boundary = teacher.schedule, teacher.denoiser.backbone.boundary_timestep
    with torch.device("cpu"):  # plain numbers wherever the models live (`fewstep plan` builds them on meta)
        high = schedule.tau_from_model_timestep(torch.tensor(boundary, dtype=torch.float32))
        while float(schedule.model_timestep(high)) < boundary:
            high = torch.nextafter(high, torch.tensor(1.0))
        low = torch.nextafter(high, torch.tensor(0.0))
        while float(schedule.model_timestep(low)) >= boundary:
            low = torch.nextafter(low, torch.tensor(0.0))
    return float(high), float(low)


def expert_scheduler(teacher: Teacher, steps_per_phase: int) -> Any:
    """The student's ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` on Wan 2.2: ``WanPipeline`` takes no
    ``sigmas=``, so the grid is what this scheduler's ``set_timesteps(K)`` gives (``K = 2·steps_per_phase``). Its
    ``shift`` is solved (``bisect_shift``; every level rises with it) so that the expert switch lies midway between
    level ``steps_per_phase − 1`` (the high expert's last) and ``steps_per_phase`` (the low expert's first).

    Raises:
        ValueError: no shift puts ``steps_per_phase`` levels on each side of the switch.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    k, config = 2 * steps_per_phase, flow_scheduler_config(teacher, stochastic_sampling=True)
    with torch.device("cpu"):  # plain numbers wherever the models live (`fewstep plan` builds them on meta)
        high, _ = expert_edges(teacher)
        midway = lambda levels: float(levels[steps_per_phase - 1] + levels[steps_per_phase]) / 2  # noqa: E731
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(bisect_shift(config, k, midway, high))
        scheduler.set_timesteps(k)
        sigmas = scheduler.sigmas[:k]
        is_high = teacher.schedule.model_timestep(sigmas) >= teacher.denoiser.backbone.boundary_timestep
    if is_high.tolist() != [True] * steps_per_phase + [False] * steps_per_phase:
        raise ValueError(
            f"No scheduler shift puts {steps_per_phase} of the {k} student levels on each side of Wan 2.2's expert "
            f"switch (timestep {teacher.denoiser.backbone.boundary_timestep:g}); got levels {sigmas.tolist()}. "
            "Use fewer objective.steps_per_phase."
        )
    return scheduler


def subinterval_fake_loss(pred: Prediction, x_t: Tensor, x_s: Tensor, eps: Tensor, schedule: Any, s: Tensor,
                          t: Tensor, prediction_type: str, clamp: float) -> Tensor:  # fmt: skip
    """Phased DMD's fake-score loss within ``(s, 1)`` (Eqs. 12–13): regress on ``x0*`` (``subinterval_x0_target``)
    in the network's own output space, weighted by ``min(1, clamp·σ²_{t|s})`` (= Eq. 13's clamped ``1/σ²_{t|s}``
    times its ``σ²_{t|s}``-scaled residual), which removes the singularity as ``t → s``."""
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    _, s_ts = transition_coeffs(schedule, s, t, x_s)
    x0_star = Fn.subinterval_x0_target(x_s, eps, a_s, s_s, a_t, s_ts.flatten(1)[:, 0])
    eps_star = (x_t.float() - bcast(a_t, x_t) * x0_star) / bcast(s_t, x_t)
    out = from_x0_eps(pred.x0, pred.eps, a_t, s_t, prediction_type)
    target = from_x0_eps(x0_star, eps_star, a_t, s_t, prediction_type)
    weight = (clamp * s_ts**2).clamp(max=1.0)
    return (weight * (out - target.detach()) ** 2).mean()


@OBJECTIVES.register("phased_dmd")
class PhasedDMD:
    """Phased DMD with LoRA experts and per-phase LoRA fake scores on one shared base."""

    Config = PhasedDMDConfig
    bypasses_prepared = False

    def __init__(self, config: PhasedDMDConfig, teacher: Teacher, student: Student) -> None:
        check_teacher(teacher, "Phased DMD")
        if not student.is_lora:
            raise ValueError("phased_dmd trains one LoRA expert per phase on the shared base: set student.kind: lora.")
        self.config, self.teacher, self.student, self.schedule = config, teacher, student, teacher.schedule
        from peft import LoraConfig

        backbone, base = student.denoiser.backbone, student.lora_config
        fake_config = LoraConfig(r=config.fake_lora_rank or base.r, lora_alpha=base.lora_alpha,
                                 target_modules=base.target_modules, init_lora_weights=True)  # fmt: skip
        self.by_expert = phases_are_experts(teacher, config)
        phases = range(config.num_phases)
        if self.by_expert:  # Wan 2.2: adapter `default` (and `fake`) on each expert is that phase's
            add_adapter(backbone, fake_config, FAKE_ADAPTER)  # B = 0: each phase's fake score starts as the teacher
            self.adapters = [(STUDENT_ADAPTER, FAKE_ADAPTER)] * 2
            within: list[str | None] = list(WAN_EXPERT_COMPONENTS.values())  # high, low
            self.scheduler = expert_scheduler(teacher, config.steps_per_phase)
            self.edges = expert_edges(teacher)
        else:
            for k in range(1, config.num_phases):
                add_adapter(backbone, base, expert_name(k))
            for k in phases:
                add_adapter(backbone, fake_config, f"fake{k}")  # B = 0: each phase's fake score starts as the teacher
            self.adapters, within = [(expert_name(k), f"fake{k}") for k in phases], [None] * config.num_phases
        # the teacher's view (Student.lora: every adapter of the base disabled) covers the new adapters too
        self.experts = [AdapterRole(student.denoiser, self.adapters[k][0], within[k]) for k in phases]
        self.fakes = [AdapterRole(student.denoiser, self.adapters[k][1], within[k]) for k in phases]
        self._prepared: dict[str, nn.Module] = {}
        self.starts = [sum(config.phase_train_steps[:k]) for k in phases]

    # --- protocol -----------------------------------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Module]:
        groups = {f"expert{k}": e for k, e in enumerate(self.experts)}
        return {**groups, **{f"fake{k}": f for k, f in enumerate(self.fakes)}}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._prepared = prepared

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def current_phase(self, step: int) -> int:
        return max((k for k, start in enumerate(self.starts) if step >= start), default=0)

    def phase(self, step: int) -> str:
        k = self.current_phase(step)
        local = step - self.starts[k]
        return f"expert{k}" if local % (self.config.fake_steps_per_generator_step + 1) == 0 else f"fake{k}"

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def sampler(self) -> PhasedSampler:
        return PhasedSampler(self)

    def sampling_spec(self) -> SamplingSpec:
        """LCMScheduler (VP) or the flow re-noise scheduler at the ``num_phases · steps_per_phase`` trained steps."""
        if self.by_expert:
            return self.expert_sampling_spec()
        k = self.config.num_phases * self.config.steps_per_phase
        cfg = self.config
        note = (
            f"trained with teacher CFG w = {cfg.real_guidance_scale}; {cfg.num_phases} experts (LoRA adapters) "
            f"switched by phase every {cfg.steps_per_phase} steps, see docs/dmd.md"
        )
        spec = dmd_sampling_spec(self.teacher, "phased_dmd", (k,), k, note)
        spec.notes.append(
            f"Phased DMD: the main export is expert 0 (steps 1–{self.config.steps_per_phase}); every expert is in "
            "experts/expert<k>/ (a LoRA, or a merged pipeline where the pipeline cannot load LoRAs). Switch experts "
            "per step (docs/dmd.md)."
        )
        return spec

    def expert_sampling_spec(self) -> SamplingSpec:
        """Wan 2.2: the stock ``WanPipeline`` with both LoRAs loaded switches the experts itself; ``num_inference_steps
        = K`` with the exported scheduler (``expert_scheduler``) gives the trained grid."""
        k, spp, w = 2 * self.config.steps_per_phase, self.config.steps_per_phase, self.config.real_guidance_scale
        levels = self.levels(())[:k]
        timesteps = self.schedule.model_timestep(levels)
        return SamplingSpec(
            objective="phased_dmd", scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler_config=dict(self.scheduler.config), recommended_steps=k, guidance_scale=1.0,
            guidance_convention=f"{GUIDANCE_CONVENTION}; trained with teacher CFG w = {w}; no CFG at inference",
            steps={k: {"timesteps": timesteps.tolist(), "levels": levels.tolist()}},
            notes=[
                f"Phased DMD on Wan 2.2: the pipeline's experts are the phases. The export holds one LoRA per expert "
                f"(steps 1-{spp} on `transformer`, high noise; steps {spp + 1}-{k} on `transformer_2`): load both as "
                "in the snippet, and WanPipeline switches them by timestep.",
                "The scheduler's shift is chosen so that WanPipeline's own grid (it takes no `sigmas=`) is the trained "
                f"one at {k} steps; it re-noises from the global RNG: call torch.manual_seed(seed) before sampling.",
            ],
        )  # fmt: skip

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Every expert under ``experts/expert<k>/`` (``export_experts``); the main export is expert 0 (on Wan 2.2
        both experts, one LoRA file per pipeline component)."""
        export_experts(self, out_dir, write_student)

    # --- pieces ------------------------------------------------------------------------------------------------

    def levels(self, shape: tuple[int, ...]) -> Tensor:
        """``K + 1`` levels: the student's ``K`` input levels and the final 0."""
        k = self.config.num_phases * self.config.steps_per_phase
        if self.by_expert:  # the exported scheduler's own grid, ending at 0
            return self.scheduler.sigmas.clone()
        # DMD's student grid; on a pipeline without sigmas= (Wan 2.1, LTX) the one it runs with the exported scheduler
        pipeline_scheduler = dmd_pipeline_scheduler(self.teacher, k)
        taus = dmd_student_grid(self.schedule, k, num_tokens(self.teacher.denoiser, shape), pipeline_scheduler)
        return torch.cat([taus, torch.zeros(1)])

    def diffusion_range(self, k: int, s: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """Where phase ``k`` draws diffusion time ``t``: the whole remaining interval ``(s, 1)``; on Wan 2.2 clipped
        to its expert's levels, so the real and fake scores of a phase run on that phase's expert only."""
        if not self.by_expert:
            return s, 1.0
        high, low = self.edges
        return (high, 1.0) if k == 0 else (s, low)

    def run_expert(self, k: int, x: Tensor, taus: Tensor, cond: Conditioning, graded: bool) -> Tensor:
        """Expert ``k``'s steps from its start level: x̂0 then re-noise, ending at its boundary level ``s``
        (``x_s = α_s·x̂0 + σ_s·z``; at ``s = 0`` just x̂0). Graded: the last step through the prepared expert."""
        spp, b = self.config.steps_per_phase, x.shape[0]
        first = k * spp
        for i in range(first, first + spp):
            last = i == first + spp - 1
            if graded and last:
                module = self._prepared.get(f"expert{k}", self.experts[k])
                x0 = module(x, taus[i].expand(b), cond).x0.float()
            else:
                with torch.no_grad(), active_adapter(self.student.denoiser.backbone, self.adapters[k][0]):
                    x0 = self.student.denoiser(x, taus[i].expand(b), cond).x0.float()
            x = renoise_step(self.schedule, x0, taus[i + 1].expand(b), torch.randn_like(x0))
        return x

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        from fewstep.objectives.dmd.dmd2 import DMD2

        shape, device = DMD2.sample_shape(self, batch)  # same shape logic (data x0, or the teacher's latents)
        cond, uncond = batch.cond, batch.uncond if batch.uncond is not None else self.teacher.uncond_like(batch.cond)
        k, b = self.current_phase(step), shape[0]
        taus = self.levels(shape).to(device)
        s = taus[(k + 1) * self.config.steps_per_phase].expand(b)
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            for j in range(k):  # frozen earlier experts
                x = self.run_expert(j, x, taus, cond, graded=False)
        generator_turn = phase.startswith("expert")
        if generator_turn:
            x_s = self.run_expert(k, x, taus, cond, graded=True)
        else:
            with torch.no_grad():
                x_s = self.run_expert(k, x, taus, cond, graded=False)
        lo = max(self.config.min_step_percent, 0.0)
        u = sample_levels(self.teacher, b, lo, 1.0, num_tokens(self.teacher.denoiser, shape), device)
        lo_t, hi_t = self.diffusion_range(k, s)
        t = lo_t + (hi_t - lo_t) * u.clamp(1e-3, 1.0)  # the whole remaining interval (s, 1) (Wan 2.2: the expert's)
        eps = torch.randn_like(x_s)
        x_t = transition(self.schedule, x_s.detach(), s, t, eps)
        metrics = {"phase_index": float(k), **health_metrics(x_s, None)}
        if generator_turn:
            with torch.no_grad():
                real = self.teacher.predict(x_t, t, cond, uncond, guidance_scale=self.config.real_guidance_scale)
                fake = self.fakes[k](x_t, t, cond)
            # project each network back to s (DDIM step t → s); at s = 0 this is the usual x̂0 difference
            proj_real, proj_fake = ddim_step(self.schedule, real, s), ddim_step(self.schedule, fake, s)
            g = Fn.dm_gradient(proj_fake, proj_real, x_s.detach(), normalize=self.config.normalize)
            loss = Fn.injected_loss(x_s, g)
            metrics.update(loss_dm=float(loss.detach()), dm_grad_norm=float(g.flatten(1).norm(dim=1).mean()))
            return LossOutput(loss, metrics)
        module = self._prepared.get(f"fake{k}", self.fakes[k])
        pred = module(x_t, t, cond)
        loss = subinterval_fake_loss(pred, x_t, x_s.detach(), eps, self.schedule, s, t,
                                     self.student.denoiser.prediction_type, self.config.fake_weight_clamp)  # fmt: skip
        metrics["loss_fake"] = float(loss.detach())
        return LossOutput(loss, metrics)


class PhasedSampler:
    """The student's sampler: expert ``k`` runs the steps of phase ``k`` (adapters switched by phase)."""

    def __init__(self, objective: PhasedDMD) -> None:
        self.objective = objective

    def __call__(self, noise: Tensor, cond: Conditioning, num_steps: int, generator: Any = None) -> Tensor:
        obj, cfg = self.objective, self.objective.config
        taus = obj.levels(tuple(noise.shape)).to(noise.device)
        per_step = [min(i // cfg.steps_per_phase, cfg.num_phases - 1) for i in range(len(taus) - 1)]
        denoiser, x, x0 = obj.student.denoiser, noise.float(), noise.float()
        with torch.no_grad():
            for i, k in enumerate(per_step):
                with active_adapter(denoiser.backbone, obj.adapters[k][0]):
                    x0 = denoiser(x, taus[i].expand(x.shape[0]), cond.to(x.device)).x0.float()
                if i + 1 < len(per_step):
                    z = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                    x = renoise_step(obj.schedule, x0, taus[i + 1].expand(x.shape[0]), z)
        return x0


def expert_students(objective: PhasedDMD) -> dict[str, Student]:
    """Every expert as a student of its own, keyed by its export sub-directory ``experts/expert<k>``: the shared
    LoRA'd base seen through adapter ``expert<k>`` (``default`` for expert 0), no weights copied. On Wan 2.2 the view
    also names its pipeline ``component`` (``transformer`` / ``transformer_2``): only that expert's LoRA is its."""
    import copy

    students = {}
    components = list(WAN_EXPERT_COMPONENTS) if objective.by_expert else [None] * objective.config.num_phases
    for k, component in enumerate(components):
        view = copy.copy(objective.student)
        object.__setattr__(view, "adapter_name", objective.adapters[k][0])
        if component is not None:
            object.__setattr__(view, "component", component)
        students[f"experts/expert{k}"] = view
    return students


def export_experts(objective: PhasedDMD, out_dir: str | Path, write_student: StudentWriter) -> list[Path]:
    """Write every expert with ``write_student`` to ``<out_dir>/experts/expert<k>/``: a diffusers LoRA (load each
    with ``pipe.load_lora_weights(dir, adapter_name=f"expert{k}")``; docs/dmd.md), or a merged pipeline per expert
    where the pipeline has no LoRA loader (``DDPMPipeline``). Returns what ``write_student`` returned per expert."""
    return [write_student(student, Path(out_dir) / sub) for sub, student in expert_students(objective).items()]


__all__ = [
    "PhasedDMD",
    "PhasedDMDConfig",
    "PhasedSampler",
    "expert_students",
    "export_experts",
    "noise_to",
    "subinterval_fake_loss",
]
