"""Pieces of the ``pcm`` objective: PCM's latent discriminator, Hyper-SD's one-step DMD terms and the
``TCDScheduler`` export spec (the segment edges on the skipping grid are in ``fewstep.solvers.grids``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import Schedule
from fewstep.objectives.dmd.functional import denoising_loss, dm_gradient, injected_loss
from fewstep.objectives.protocol import LossOutput
from fewstep.objectives.spec import SamplingSpec, scheduler_from_teacher
from fewstep.solvers.steps import noise_to


class LatentDiscriminator(nn.Module):
    """A small conv discriminator on noised latents ``[b, c, h, w]`` with the noise level as an extra channel.

    PCM's discriminator reads the edge prediction and the target, both forward-noised into the segment.
    """

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1),
        )  # fmt: skip

    @classmethod
    def for_teacher(cls, teacher: Teacher) -> LatentDiscriminator:
        """Sized for the teacher's latent channels (its pipeline's latent shape)."""
        if teacher.pipeline is None:
            config = getattr(teacher.denoiser.backbone, "config", None) or {}
            channels = config.get("in_channels")
        else:
            from fewstep.models.backbones import latent_shape

            channels = latent_shape(teacher, 1)[1]
        if channels is None:
            raise ValueError(
                "objective.adv_weight > 0 needs image latents [b, c, h, w] and a teacher whose latent channels are "
                "known (a diffusers pipeline or a backbone config with in_channels). Set adv_weight: 0."
            )
        return cls(int(channels))

    def forward(self, x: Tensor, tau: Tensor) -> Tensor:
        """Scores ``[b]`` of noised latents ``x`` ``[b, c, h, w]`` at levels ``tau`` ``[b]``."""
        level = tau.float().view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        dtype = self.net[0].weight.dtype
        return self.net(torch.cat([x.to(dtype), level.to(dtype)], 1)).flatten(1).mean(1).float()


def hinge_d_loss(fake_score: Tensor, real_score: Tensor) -> Tensor:
    """The discriminator's hinge loss ``E[relu(1 − D(real))] + E[relu(1 + D(fake))]``."""
    return F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean()


def tcd_spec(
    teacher: Teacher, timesteps: dict[int, list[int]], original_inference_steps: int, gamma: float, **common: Any
) -> SamplingSpec:
    """A VP student sampled by ``TCDScheduler`` with ``eta = γ``: ``num_inference_steps`` alone picks
    ``timesteps[num_steps]`` from the ``original_inference_steps`` skipping grid (informative)."""
    from diffusers import TCDScheduler

    from fewstep.objectives.spec import SamplingSpec

    scheduler = scheduler_from_teacher(
        TCDScheduler, teacher, original_inference_steps=original_inference_steps,
        prediction_type=teacher.denoiser.prediction_type, clip_sample=False, thresholding=False,
    )  # fmt: skip
    notes = [
        f"Sample with TCDScheduler and eta={gamma} (the γ the student was sampled with in training); higher eta "
        "for fewer steps, lower for more detail (Hyper-SD). One LoRA serves every exported step count."
    ]
    return SamplingSpec(
        scheduler_class="TCDScheduler",
        scheduler_config=dict(scheduler.config),
        steps={n: {"timesteps": list(t)} for n, t in timesteps.items()},
        notes=notes,
        extra_call_kwargs={"eta": gamma},
        **common,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Hyper-SD one-step enhancement: the DMD term on the 1-step sample, DMD's pure functions
# ---------------------------------------------------------------------------------------------------------------------


def _one_step(student: Denoiser, grid: Tensor, cond: Conditioning, shape: tuple[int, ...]) -> Tensor:
    """The student's 1-step sample ``x̂0(z, τ_max)`` from fresh noise (the TCD 1-step start), with grad."""
    device = next(student.parameters()).device
    z = torch.randn(shape, device=device)
    return student(z, grid[-1].to(device).expand(shape[0]), cond).x0


def _noised(schedule: Schedule, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    tau = (0.02 + 0.96 * torch.rand(x.shape[0])).to(x.device)  # DMD: t ~ U[0.02, 0.98]
    eps = torch.randn_like(x)
    return noise_to(schedule, x.detach(), eps, tau), tau, eps


def one_step_dmd_loss(
    student: Denoiser,
    fake: nn.Module,
    teacher: Teacher,
    grid: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    shape: tuple[int, ...],
    guidance_scale: float,
) -> Tensor:
    """DMD on the 1-step sample ``G``: ``g = (x̂0_fake − x̂0_real^cfg)/mean|G − x̂0_real|``, injected into ``G``."""
    G = _one_step(student, grid, cond, shape)
    x_t, tau, _ = _noised(teacher.schedule, G)
    x0_real = teacher.predict(x_t, tau, cond, uncond, guidance_scale=guidance_scale).x0
    with torch.no_grad():
        x0_fake = fake(x_t, tau, cond).x0
    return injected_loss(G, dm_gradient(x0_fake, x0_real, G.detach()))


def critic_loss(
    student: Denoiser, fake: nn.Module, schedule: Schedule, grid: Tensor, cond: Conditioning, shape: tuple[int, ...]
) -> LossOutput:
    """The fake score's denoising loss on the student's 1-step samples (DMD's fake-score update)."""
    with torch.no_grad():
        G = _one_step(student, grid, cond, shape)
    x_t, tau, eps = _noised(schedule, G)
    pred = fake(x_t, tau, cond)
    a, s = schedule.alpha(tau).to(G.device), schedule.sigma(tau).to(G.device)
    loss = denoising_loss(pred.x0, pred.eps, G, eps, a, s, fake.denoiser.prediction_type)
    return LossOutput(loss, {"loss": float(loss.detach()), "fake": float(loss.detach())})
