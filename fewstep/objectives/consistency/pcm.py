"""PCM and Hyper-SD TSCD: phased (trajectory-segmented) consistency distillation.

PCM (Wang et al. 2024, arXiv 2405.18407; reference ``G-U-N/Phased-Consistency-Model`` ``train_pcm_lora_sd15_adv.py``)
splits the teacher's ODE into M segments and makes the student consistent *within* each segment: from any point it
jumps deterministically to the lower edge of its segment. Hyper-SD's TSCD (Ren et al. 2024, arXiv 2404.13686) trains
the same LoRA through the curriculum M = 8 → 4 → 2 → 1 (each stage continues from the last). One training step:

1. an interval ``i`` of the skipping grid (``τ_{i+1} → τ_i``), ``x_{i+1} = α·x0 + σ·ε`` and its segment's edge ``e``;
2. student at ``(x_{i+1}, τ_{i+1})`` → ``(x̂0, ε̂)`` → DDIM jump to the edge (``c_skip = 0``: the boundary holds by
   construction);
3. one teacher DDIM step to ``τ_i`` (CFG in ω form, or the conditional teacher with prompt dropout, PCM's
   ``not_apply_cfg_solver``); target = the student under ``no_grad`` at ``(x_i, τ_i)`` jumped to the same edge
   (``x_i`` itself when ``i = e``);
4. pseudo-Huber distance; optional adversarial term on edge predictions forward-noised into the segment, and an
   optional reward term (any differentiable ``reward(x̂0, cond) -> [b]``, ReFL-style, Hyper-SD).

A recipe's ``reward: custom:<module>:<function>`` imports, and so runs, that Python module. It is imported only when
the reward is used (``reward_weight > 0``, when training starts) and only with the user's consent: ``fewstep
--allow-code`` or the environment variable ``FEWSTEP_ALLOW_CODE=1``. The current directory is not searched for it
implicitly (``python -m`` puts it first on ``sys.path``); put the module's directory on ``PYTHONPATH``.

Segments are aligned with ``TCDScheduler``'s picks from the same skipping grid, so a stock ``TCDScheduler`` at
M steps visits exactly the trained segment starts, and its γ (``eta``) step is our sampler's.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.convert import Prediction
from fewstep.noise.schedules import Schedule
from fewstep.objectives.consistency.hyper_sd import (
    LatentDiscriminator,
    critic_loss,
    hinge_d_loss,
    one_step_dmd_loss,
    tcd_spec,
)
from fewstep.objectives.dmd.roles import fake_role, student_role
from fewstep.objectives.losses import pseudo_huber
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, flow_euler_spec, flow_renoise_spec
from fewstep.solvers.grids import segment_edges, skipping_grid
from fewstep.solvers.steps import ddim_step, noise_to, transition

RewardFn = Callable[[Tensor, Conditioning], Tensor]
ALLOW_CODE_ENV = "FEWSTEP_ALLOW_CODE"  # "1": the user lets recipes import the code they name (fewstep --allow-code)
_REWARD_SPEC = re.compile(r"^custom:([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


class CurriculumStage(BaseModel):
    """``segments`` for ``steps`` optimizer steps (the last stage runs to the end of training)."""

    model_config = ConfigDict(extra="forbid")

    segments: int = Field(ge=1)
    steps: int = Field(ge=1)


class PCMConfig(BaseModel):
    """Recipe block of the ``pcm`` objective (PCM defaults; Hyper-SD TSCD = a ``curriculum``).

    ``w_min``/``w_max`` are ω in LCM's convention (ω = w − 1, w the Imagen/diffusers ``guidance_scale``).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["pcm"] = "pcm"
    num_ddim_timesteps: int = Field(50, ge=1, description="intervals of the skipping grid")
    segments: int = Field(4, ge=1, description="PCM phases M (ignored when a curriculum is given)")
    curriculum: list[CurriculumStage] | None = Field(None, min_length=1, description="TSCD stages, e.g. 8→4→2→1")
    w_min: float = Field(3.0, ge=0.0, description="lowest ω (LCM convention) of the teacher's CFG")
    w_max: float = Field(4.0, ge=0.0, description="highest ω; PCM suggests ω ≈ 4–5")
    cfg_free_teacher: bool = Field(False, description="PCM not_apply_cfg_solver: conditional teacher, CFG at use")
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="empty-prompt rate with cfg_free_teacher")
    loss_type: Literal["l2", "huber"] = "huber"
    huber_c: float = Field(0.001, gt=0.0)
    jump_weighting: bool = Field(
        False, description="divide each sample's distance by its edge jump's ε gain max(1, |σ_e − α_e·σ/α|)"
    )
    adv_weight: float = Field(0.0, ge=0.0, description="adversarial term weight (PCM 0.1); 0 turns it off")
    reward_weight: float = Field(0.0, ge=0.0, description="reward-feedback weight; needs `reward`")
    reward: str | None = Field(
        None,
        description="custom:<module>:<function> returning a [b] reward of (x̂0, cond). Runs code: the module is "
        "imported when reward_weight > 0 and training starts, only with `fewstep --allow-code` (or "
        "FEWSTEP_ALLOW_CODE=1)",
    )
    gamma: float = Field(0.3, ge=0.0, le=1.0, description="TCD γ (diffusers `eta`) of the sampler")
    dmd_weight: float = Field(0.0, ge=0.0, description="Hyper-SD one-step enhancement (DMD term); 0 turns it off")
    dmd_start_step: int = Field(0, ge=0, description="the DMD stage starts here (e.g. after the curriculum)")
    dmd_guidance_scale: float = Field(4.5, ge=1.0, description="Imagen w of the real score in the DMD term")
    dmd_critic_steps: int = Field(1, ge=1, description="fake-score steps per student step in the DMD stage")

    @model_validator(mode="after")
    def _check(self) -> PCMConfig:
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min}); both are ω = w − 1.")
        for m in [s.segments for s in self.curriculum or []] + [self.segments]:
            if m > self.num_ddim_timesteps:
                raise ValueError(f"segments={m} exceeds num_ddim_timesteps={self.num_ddim_timesteps}.")
        if self.reward is not None:
            parse_reward(self.reward)
        return self


def curriculum_segments(config: PCMConfig, step: int) -> int:
    """Segments M at ``step``: the curriculum stage it falls into (Hyper-SD TSCD), else ``config.segments``."""
    if not config.curriculum:
        return config.segments
    end = 0
    for stage in config.curriculum:
        end += stage.steps
        if step < end:
            return stage.segments
    return config.curriculum[-1].segments


def pcm_edge_jump(pred_x0: Tensor, pred_eps: Tensor, schedule: Schedule, tau_edge: Tensor) -> Tensor:
    """PCM's deterministic jump to the segment edge ``x_e = α_e·x̂0 + σ_e·ε̂`` (c_skip = 0, c_out = 1)."""
    return ddim_step(schedule, Prediction(pred_x0, pred_eps), tau_edge)


def jump_gain(schedule: Schedule, tau: Tensor, tau_edge: Tensor) -> Tensor:
    """``|∂x_e/∂ε̂| = |σ_e − α_e·σ/α|`` ``[b]``: how much the jump ``τ → τ_edge`` magnifies an error of ``ε̂``.

    From high noise to the clean edge it is ``σ/α`` (about 15 at t = 999 on SD's schedule), so without weighting the
    longest jumps dominate the gradient of the shared weights once segments are long (Hyper-SD's 2- and 1-segment
    stages)."""
    a, s = schedule.alpha(tau).float(), schedule.sigma(tau).float()
    a_e, s_e = schedule.alpha(tau_edge).float(), schedule.sigma(tau_edge).float()
    return (s_e - a_e * s / a.clamp(min=1e-4)).abs()


def parse_reward(spec: str) -> tuple[str, str]:
    """``custom:<module>:<function>`` → ``(module, function)``, checked without importing anything."""
    found = _REWARD_SPEC.match(spec)
    if found is None:
        raise ValueError(
            f"reward {spec!r} must read custom:<module>:<function> (a dotted module path and a function name), "
            "e.g. custom:my_rewards:aesthetic."
        )
    return found.group(1), found.group(2)


def code_allowed() -> bool:
    """Whether the user let recipes import the code they name (``fewstep --allow-code``, ``FEWSTEP_ALLOW_CODE=1``)."""
    return os.environ.get(ALLOW_CODE_ENV) == "1"


@contextmanager
def _without_implicit_cwd() -> Iterator[None]:
    """``sys.path`` without the entry ``python -m`` / ``python -c`` put first for the current directory."""
    implicit = not sys.flags.safe_path and bool(sys.path) and sys.path[0] in ("", os.getcwd())
    entry = sys.path.pop(0) if implicit else None
    try:
        yield
    finally:
        if entry is not None:
            sys.path.insert(0, entry)


def load_reward(spec: str) -> RewardFn:
    """``custom:<module>:<function>`` → the function. Importing the module runs its code, so this needs the user's
    consent (``code_allowed``); the current directory is not searched unless it is on ``PYTHONPATH``.

    Raises:
        ValueError: a malformed spec, no consent, a module that is not found, or a name that is not a function.
    """
    module, fn = parse_reward(spec)
    if not code_allowed():
        raise ValueError(
            f"objective.reward {spec!r} would import and run the Python module {module!r}. fewstep runs a recipe's "
            f"code only when asked: pass --allow-code (or set {ALLOW_CODE_ENV}=1) if you trust this recipe, or set "
            "objective.reward_weight: 0."
        )
    with _without_implicit_cwd():
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not (module == err.name or module.startswith(f"{err.name}.")):
                raise
            raise ValueError(
                f"objective.reward {spec!r}: no module {err.name!r} on the Python path (the current directory is not "
                "searched implicitly). Add the directory that holds it to PYTHONPATH."
            ) from None
    function = getattr(imported, fn, None)
    if not callable(function):
        raise ValueError(f"objective.reward {spec!r}: {module!r} has no function {fn!r}.")
    return function


# ---------------------------------------------------------------------------------------------------------------------
# Sampler: TCD γ-sampling at the segment starts (diffusers TCDScheduler for VP)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TCDSampler:
    """``num_steps`` segment starts; at each the student's ``(x̂0, ε̂)``, a deterministic step to
    ``s = (1 − γ)·prev`` and forward noise ``s → prev`` (TCD). VP follows ``TCDScheduler.step``
    exactly: integer ``timestep_s = floor((1 − γ)·t_prev)``, the last step ends at index 0 without noise."""

    denoiser: Denoiser
    schedule: Schedule
    grid: Tensor  # [N + 1] ascending τ
    gamma: float

    def timesteps(self, num_steps: int) -> Tensor:
        """The τ levels visited, descending (``TCDScheduler.set_timesteps`` picks on the skipping grid)."""
        n = self.grid.shape[0] - 1
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps={num_steps} is not in [1, {n}] (objective.num_ddim_timesteps).")
        starts = segment_edges(n, num_steps, starts=True)
        return self.grid[starts]

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = self.timesteps(num_steps).to(noise.device)
        x = noise.float()
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                for i in range(num_steps):
                    tau_prev = taus[i + 1] if i + 1 < num_steps else self.grid[0].to(x.device)
                    pred = self.denoiser(x, taus[i].expand(x.shape[0]), cond)
                    tau_s = self._tau_s(tau_prev)
                    x = ddim_step(self.schedule, pred, tau_s.expand(x.shape[0]))
                    if self.gamma > 0 and i + 1 < num_steps:
                        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
                        x = transition(self.schedule, x, tau_s.expand(x.shape[0]), tau_prev.expand(x.shape[0]), z)
        finally:
            self.denoiser.train(was_training)
        return x

    def _tau_s(self, tau_prev: Tensor) -> Tensor:
        if self.schedule.kind == "vp":
            t_prev = self.schedule.model_timestep(tau_prev)
            return self.schedule.tau_from_model_timestep(torch.floor((1 - self.gamma) * t_prev))
        return (1 - self.gamma) * tau_prev


# ---------------------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("pcm")
class PCM:
    """Phased consistency distillation (PCM) and Hyper-SD's trajectory-segmented curriculum (TSCD).

    Args:
        config: the ``objective`` recipe block.
        teacher: the frozen VP or flow teacher.
        student: a LoRA (one LoRA serves every segment count) or full student.
        reward: a differentiable ``reward(x̂0, cond) -> [b]`` (overrides ``config.reward``).
    """

    Config = PCMConfig
    bypasses_prepared = False

    def __init__(self, config: PCMConfig, teacher: Teacher, student: Student, reward: RewardFn | None = None) -> None:
        if teacher.schedule.kind not in ("vp", "flow"):
            raise ValueError(f"PCM needs a VP or flow teacher; got a {teacher.schedule.kind!r} schedule.")
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        self.grid = skipping_grid(self.schedule, config.num_ddim_timesteps)  # [N + 1] ascending τ
        self.reward = reward  # a recipe's custom: reward is imported when training starts (attach), if it is used
        self._reward_spec = config.reward if reward is None and config.reward_weight > 0 else None
        if config.reward_weight > 0 and self.reward is None and self._reward_spec is None:
            raise ValueError("objective.reward_weight > 0 needs a reward: set objective.reward: custom:<mod>:<fn>.")
        self.discriminator = LatentDiscriminator.for_teacher(teacher) if config.adv_weight > 0 else None
        self.fake, self.generator = None, student
        if config.dmd_weight > 0:  # the DMD objective's roles: fake score = a second adapter (or a base copy)
            kind = "lora" if student.is_lora else "full"
            self.fake = fake_role(student, teacher, kind, student.lora_config.r if student.is_lora else 64, None)
            self.generator = student_role(student, shared_fake=kind == "lora")

    # --- protocol -----------------------------------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"student": self.generator}
        if self.discriminator is not None:
            groups["discriminator"] = self.discriminator
        if self.fake is not None:
            groups["fake_score"] = self.fake
        return groups

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        if "discriminator" in prepared:
            self._disc = prepared["discriminator"]
        self._load_reward()  # training starts: a missing consent or module fails now, not at the first step

    def _load_reward(self) -> None:
        if self._reward_spec is not None:
            self.reward, self._reward_spec = load_reward(self._reward_spec), None

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        """Student, then the discriminator (PCM's alternation, with ``adv_weight``), then ``dmd_critic_steps``
        fake-score steps once the DMD stage has started."""
        cycle = ["student"] + (["discriminator"] if self.discriminator is not None else [])
        if self.fake is not None and step >= self.config.dmd_start_step:
            cycle += ["fake_score"] * self.config.dmd_critic_steps
        return cycle[step % len(cycle)]

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        if batch.x0 is None:
            raise ValueError("PCM distils along the teacher's ODE from noised data: the batch needs `x0`.")
        cfg, x0 = self.config, batch.x0.float()
        b, segments = x0.shape[0], curriculum_segments(cfg, step)
        idx = torch.randint(0, cfg.num_ddim_timesteps, (b,))
        edge = self.edge_index(idx, segments)
        tau_hi, tau_lo, tau_e = (self.grid[j].to(x0.device) for j in (idx + 1, idx, edge))
        x_hi = noise_to(self.schedule, x0, torch.randn_like(x0), tau_hi)
        cond, uncond, omega = self._teacher_inputs(batch, b)
        if phase == "fake_score":
            return critic_loss(self.student.denoiser, self.fake, self.schedule, self.grid, cond, x0.shape)

        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, tau_hi, tau_lo, cond, uncond, omega)
            target = pcm_edge_jump(*self._predict(self.student.denoiser, x_lo, tau_lo, cond), self.schedule, tau_e)
            target = torch.where((idx == edge).view(-1, *[1] * (x0.ndim - 1)).to(x0.device), x_lo, target)
        if phase == "discriminator":
            with torch.no_grad():
                fake = pcm_edge_jump(*self._predict(self.student.denoiser, x_hi, tau_hi, cond), self.schedule, tau_e)
            loss = hinge_d_loss(*self._adv_scores(fake, target, edge, segments))
            return LossOutput(loss, {"loss": float(loss.detach()), "segments": float(segments)})

        x0_hat, eps_hat = self._predict(self.student.denoiser, x_hi, tau_hi, cond)
        pred = pcm_edge_jump(x0_hat, eps_hat, self.schedule, tau_e)
        huber = cfg.loss_type == "huber"
        dist = (pseudo_huber(pred, target, cfg.huber_c) if huber else (pred - target).pow(2)).flatten(1).mean(1)
        if cfg.jump_weighting:
            dist = dist / jump_gain(self.schedule, tau_hi, tau_e).clamp(min=1.0)
        loss = dist.mean()
        metrics = {"consistency": float(loss.detach()), "segments": float(segments)}
        if self.discriminator is not None:
            fake_score, _ = self._adv_scores(pred, target, edge, segments, with_real=False)
            adv = -fake_score.mean()
            loss = loss + cfg.adv_weight * adv
            metrics["adv_g"] = float(adv.detach())
        if cfg.reward_weight > 0:
            self._load_reward()
        if self.reward is not None and cfg.reward_weight > 0:
            reward = self.reward(x0_hat, cond).mean()  # ReFL: the one-step x̂0 from a random level
            loss = loss - cfg.reward_weight * reward
            metrics["reward"] = float(reward.detach())
        if self.fake is not None and step >= cfg.dmd_start_step:
            null = uncond if uncond is not None else self.teacher.uncond_like(batch.cond)
            loss_dmd = one_step_dmd_loss(self.student.denoiser, self.fake, self.teacher, self.grid, batch.cond,
                                         null, x0.shape, cfg.dmd_guidance_scale)  # fmt: skip
            loss = loss + cfg.dmd_weight * loss_dmd
            metrics["dmd"] = float(loss_dmd.detach())
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)

    def on_step_end(self, step: int, phase: str) -> None:
        """Nothing: the target is the student itself under ``no_grad`` (PCM), the curriculum is a function of step."""

    def sampler(self) -> TCDSampler:
        return TCDSampler(self.student.denoiser, self.schedule, self.grid, self.config.gamma)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- pieces -------------------------------------------------------------------------------------------------

    def edge_index(self, idx: Tensor, segments: int) -> Tensor:
        """The lower edge (grid index) of the segment containing interval ``idx`` (``τ_{idx+1} → τ_idx``)."""
        edges = segment_edges(self.config.num_ddim_timesteps, segments, starts=False)  # ascending, edges[0] = 0
        return edges[torch.searchsorted(edges, idx, right=True) - 1]

    def teacher_step(
        self, x: Tensor, tau_hi: Tensor, tau_lo: Tensor, cond: Conditioning, uncond: Conditioning | None, omega: Tensor
    ) -> Tensor:
        """One teacher DDIM (flow: Euler) step ``τ_{i+1} → τ_i``; CFG in ω form unless ``cfg_free_teacher``."""
        w: float | Tensor = 1.0 if (self.config.cfg_free_teacher or self.config.w_max == 0) else omega + 1.0
        return ddim_step(self.schedule, self.teacher.predict(x, tau_hi, cond, uncond, guidance_scale=w), tau_lo)

    def _teacher_inputs(self, batch: Batch, b: int) -> tuple[Conditioning, Conditioning | None, Tensor]:
        cfg = self.config
        omega = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b)).to(batch.x0.device)
        cond, uncond = batch.cond, batch.uncond
        if cfg.cfg_free_teacher and cfg.cond_dropout > 0:  # PCM: empty prompts keep the student CFG-compatible
            null = uncond if uncond is not None else self.teacher.uncond_like(cond)
            if null is not None:
                drop = torch.rand(b) < cfg.cond_dropout
                keep = torch.where(drop, torch.arange(b) + b, torch.arange(b))
                cond = Conditioning.cat([cond, null]).index(keep.to(batch.x0.device))
        return cond, uncond, omega

    @staticmethod
    def _predict(denoiser: nn.Module, x: Tensor, tau: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        pred = denoiser(x, tau, cond)
        return pred.x0, pred.eps

    def _adv_scores(
        self, fake: Tensor, real: Tensor, edge: Tensor, segments: int, with_real: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """D on edge predictions forward-noised to ``t_adv ∈ [edge, edge + N/M)`` (PCM's ``noise_travel``)."""
        n = self.config.num_ddim_timesteps
        span = max(1, n // segments)
        adv = (edge + torch.randint(0, span, edge.shape)).clamp(max=n)
        tau_e, tau_adv = self.grid[edge].to(fake.device), self.grid[adv].to(fake.device)
        noise = torch.randn_like(fake)
        disc = getattr(self, "_disc", self.discriminator)
        fake_score = disc(transition(self.schedule, fake, tau_e, tau_adv, noise), tau_adv)
        if not with_real:
            return fake_score, None
        return fake_score, disc(transition(self.schedule, real, tau_e, tau_adv, noise), tau_adv)

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4, 8)) -> SamplingSpec:
        """VP: ``TCDScheduler`` on the teacher's betas with ``eta = γ``. Flow: ``FlowMatchEulerDiscreteScheduler`` at
        the segment edges, deterministic (γ = 0: the DDIM jumps exactly) or ``stochastic_sampling`` (γ = 1: x̂0, then
        fresh noise to the next edge); diffusers has no flow γ-sampler in between, so 0 < γ < 1 exports γ = 0."""
        cfg = self.config
        steps = tuple(s for s in steps if s <= cfg.num_ddim_timesteps)
        w = 1.0 + cfg.w_min if cfg.cfg_free_teacher else 1.0
        conv = ("conditional teacher (CFG usable at sampling)" if cfg.cfg_free_teacher
                else f"trained with teacher CFG ω ∈ [{cfg.w_min}, {cfg.w_max}] (LCM convention ω = w − 1)")  # fmt: skip
        common = dict(objective="pcm", recommended_steps=4 if 4 in steps else max(steps), guidance_scale=w,
                      guidance_convention=f"{GUIDANCE_CONVENTION}; {conv}")  # fmt: skip
        if self.schedule.kind == "vp":
            timesteps = {s: self.schedule.model_timestep(self.sampler().timesteps(s)).long().tolist() for s in steps}
            return tcd_spec(self.teacher, timesteps, cfg.num_ddim_timesteps, cfg.gamma, **common)
        n = cfg.num_ddim_timesteps
        unshifted = torch.arange(n + 1, dtype=torch.float32) / n  # the skipping grid before the scheduler's shift
        sigmas = {s: unshifted[segment_edges(n, s, starts=True)].tolist() for s in steps}
        levels = {s: self.sampler().timesteps(s).tolist() for s in steps}
        if cfg.gamma == 1.0:
            return flow_renoise_spec(self.teacher, sigmas, levels, 0.0, **common)
        note = "" if cfg.gamma == 0.0 else (
            f"fewstep samples this student with TCD γ = {cfg.gamma}; diffusers has no γ-sampler for flow models, so "
            "this scheduler samples it at γ = 0 (set objective.gamma to 0 or 1 for an exact match)."
        )  # fmt: skip
        return flow_euler_spec(self.teacher, sigmas, levels, note, **common)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""
