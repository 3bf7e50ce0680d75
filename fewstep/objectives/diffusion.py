"""``diffusion``: plain denoising score matching in the model's own prediction type (teacher training, fine-tunes).

Ho et al. 2020 (DDPM, "simple" loss ``‖ε̂ − ε‖²``), generalised to every prediction type as in diffusers' training
scripts and to flow matching (Lipman et al. 2023, ``‖û − (ε − x0)‖²``). One step:

1. draw τ (uniform, or SD3's logit-normal; VP teachers stay on their integer grid),
   ``ε ~ N(0, I)`` and ``x_τ = α(τ)·x0 + σ(τ)·ε``;
2. with probability ``cond_dropout`` per sample replace the conditioning by the teacher's null conditioning, so the
   student learns the unconditional model too and can be sampled with classifier-free guidance;
3. regress the student's output onto ``from_x0_eps(x0, ε)`` in its prediction type.

The sampler is the teacher-style deterministic one (DDIM η = 0, Euler for flow) on a uniform grid; for VP the
``trailing`` grid, so the first step starts at the last training index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning, pad_prompts
from fewstep.models.denoiser import Denoiser, eval_mode
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise import timesteps
from fewstep.noise.convert import Prediction, from_x0_eps
from fewstep.noise.schedules import Schedule
from fewstep.noise.timesteps import TAU_EPS
from fewstep.objectives.protocol import OBJECTIVES, BackboneUse, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, deterministic_spec
from fewstep.solvers.grids import sampling_taus
from fewstep.solvers.samplers import sample_ddim
from fewstep.solvers.steps import noise_to


class DiffusionConfig(BaseModel):
    """Recipe block of the ``diffusion`` objective."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["diffusion"] = "diffusion"
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = Field(0.0, description="logit-normal mean (SD3: 0)")
    logit_std: float = Field(1.0, gt=0.0, description="logit-normal std (SD3: 1)")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0, description="per-sample probability of the null conditioning")
    sample_guidance_scale: float | None = Field(
        None, description="w (Imagen convention, 1 = off) for sample grids; None: the teacher's guidance_scale"
    )


def sample_tau(schedule: Schedule, n: int, config: DiffusionConfig) -> Tensor:
    """Training levels ``[n]``. VP: integer indices (uniform over ``0..N-1``, or logit-normal rounded to the grid)."""
    if schedule.kind == "vp":
        if config.time_sampler == "uniform":
            index = torch.randint(0, schedule.num_train_timesteps, (n,))
        else:
            index = schedule.model_timestep(timesteps.logit_normal(n, None, config.logit_mean, config.logit_std))
        return schedule.tau_from_model_timestep(index)
    if config.time_sampler == "uniform":
        tau = timesteps.uniform(n)
    else:
        tau = timesteps.logit_normal(n, None, config.logit_mean, config.logit_std)
    return tau.clamp(TAU_EPS, 1 - TAU_EPS)


def mix_conditioning(cond: Conditioning, uncond: Conditioning, drop: Tensor) -> Conditioning:
    """Per sample: ``uncond`` where ``drop[i]`` else ``cond``. Fields only ``cond`` has (or shared ids) are kept."""
    cond, uncond = pad_prompts([cond, uncond])  # masked text tokens (Qwen-Image) of different lengths
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cond):
        c, u = getattr(cond, f.name), getattr(uncond, f.name)
        if f.name == "extra":
            out["extra"] = {k: _where(drop, u.get(k), v) for k, v in c.items()}
        elif f.name in ("txt_ids", "img_ids"):
            out[f.name] = c
        else:
            out[f.name] = _where(drop, u, c)
    return Conditioning(**out)


def _where(drop: Tensor, u: Any, c: Any) -> Any:
    if not isinstance(c, Tensor) or not isinstance(u, Tensor) or u.shape != c.shape:
        return c
    mask = drop.to(c.device).reshape((-1,) + (1,) * (c.ndim - 1))
    return torch.where(mask, u.to(c.dtype), c)


@dataclass
class DiffusionSampler:
    """DDIM (η = 0) / Euler sampling of the student, with CFG on its own outputs when ``guidance_scale != 1``."""

    denoiser: Denoiser
    schedule: Schedule
    guidance_scale: float = 1.0
    uncond_like: Callable[[Conditioning], Conditioning | None] | None = None

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = sampling_taus(self.schedule, num_steps, num_tokens(self.denoiser, noise.shape)).to(noise.device)
        cond = cond.to(noise.device)
        with torch.no_grad(), eval_mode(self.denoiser):
            return sample_ddim(self._predict(cond), self.schedule, noise, taus)

    def _predict(self, cond: Conditioning) -> Callable[[Tensor, Tensor], Prediction]:
        w = float(self.guidance_scale)
        uncond = self.uncond_like(cond) if (w != 1.0 and self.uncond_like is not None) else None
        if w != 1.0 and uncond is None:
            raise ValueError(f"Sampling with guidance_scale={w} needs the teacher's null conditioning; it has none.")

        def predict(x: Tensor, tau: Tensor) -> Prediction:
            if uncond is None:
                return self.denoiser(x, tau, cond)
            both = Conditioning.cat([uncond, cond])
            out_u, out_c = self.denoiser.raw(torch.cat([x, x]), torch.cat([tau, tau]), both).float().chunk(2)
            return self.denoiser.to_prediction(out_u + w * (out_c - out_u), x.float(), tau)  # Imagen CFG

        return predict


@OBJECTIVES.register("diffusion")
class Diffusion:
    """Denoising score matching of the student in its own prediction type (teacher training, plain fine-tunes).

    Args:
        config: the ``objective`` recipe block.
        teacher: supplies the schedule, the prediction type (through the student) and the null conditioning.
        student: the trained network (full or LoRA).
    """

    Config = DiffusionConfig
    bypasses_prepared = False

    def __init__(self, config: DiffusionConfig, teacher: Teacher, student: Student) -> None:
        self.config = config
        self.teacher = teacher
        self.student = student
        self.schedule = student.denoiser.schedule
        self._online: nn.Module = student

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._online = prepared["student"]

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def backbone_use(self) -> dict[str, BackboneUse]:
        """For ``fewstep plan``: one forward with gradients, no teacher forward."""
        return {"student": BackboneUse(graphs=1.0, no_grad_batch=0.0)}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        return "student"

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """``mean‖out_θ(x_τ, τ, c) − target(x0, ε)‖²`` with the target in the student's prediction type."""
        if batch.x0 is None:
            raise ValueError(
                "The diffusion objective regresses on data: the batch needs `x0`. Use data.source: digits or "
                "image_folder, not the data-free prompts source."
            )
        x0 = batch.x0.float()  # [b, c, h, w]
        tau = sample_tau(self.schedule, x0.shape[0], self.config).to(x0.device)
        eps = torch.randn_like(x0)
        x_tau = noise_to(self.schedule, x0, eps, tau)
        cond = self.drop_conditioning(batch.cond, batch.uncond)
        pred = self._online(x_tau, tau, cond)
        alpha, sigma = self.schedule.alpha(tau), self.schedule.sigma(tau)
        kind = self.student.denoiser.prediction_type
        # The network's own output (the affine conversion inverted) against the target of that type.
        out = from_x0_eps(pred.x0, pred.eps, alpha, sigma, kind)
        target = from_x0_eps(x0, eps, alpha, sigma, kind)
        loss = F.mse_loss(out, target)
        return LossOutput(loss, {"tau_mean": float(tau.mean())})

    def drop_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        """Classifier-free guidance training: the null conditioning for a ``cond_dropout`` fraction of samples."""
        p = self.config.cond_dropout
        b = cond.batch_size
        if p == 0.0 or b is None:  # nothing to drop, or an unconditional model (empty conditioning)
            return cond
        uncond = uncond if uncond is not None else self.teacher.uncond_like(cond)
        if uncond is None:
            raise ValueError(
                f"objective.cond_dropout={p} replaces the conditioning by the teacher's null conditioning, but "
                f"this {self.teacher.family} teacher has none. Set objective.cond_dropout: 0."
            )
        return mix_conditioning(cond, uncond, torch.rand(b) < p)

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(
            self.student.denoiser,
            self.schedule,
            guidance_scale=self.guidance_scale(),
            uncond_like=self.teacher.uncond_like if self.teacher.null_cond is not None else None,
        )

    def guidance_scale(self) -> float:
        """The Imagen ``w`` the student is sampled with: ``sample_guidance_scale``, else the teacher's."""
        w = self.config.sample_guidance_scale
        return self.teacher.guidance_scale if w is None else w

    def sampling_spec(self, steps: tuple[int, ...] = (10, 25, 50)) -> SamplingSpec:
        """The teacher's own kind of sampler: DDIM (trailing) for VP, deterministic Euler for flow, with CFG."""
        notes = ["A denoising fine-tune samples like its teacher: many steps, classifier-free guidance as usual."]
        return deterministic_spec(
            self.teacher, "diffusion", steps, "euler", recommended=25, guidance_scale=self.guidance_scale(),
            guidance_convention=f"{GUIDANCE_CONVENTION}; trained with cond_dropout={self.config.cond_dropout}",
            notes=notes,
        )  # fmt: skip

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"The diffusion objective keeps no state; got keys {sorted(state)}.")
