"""TBCM: image-free continuous-time consistency on the teacher's own trajectories (hustvl, arXiv
2511.20410).

The training states come from the teacher's CFG sampling trajectories ("generation space"), not from noised data:
no data set and no VAE, only prompts. The cache (``fewstep.data.trajectories``) holds ``(x_u, u, F_T)`` in TrigFlow
coordinates with the teacher velocity the sampler used; each step applies exactly the sCM loss (the shared
``scm_update``) with the student's JVP computed online.

The cache fills before training (``prepare``): while it has fewer than ``num_shards`` shards, one shard is rolled
out from the prompts of the run's next batch (noise seeded by shard index) and appended; training then reads only
the cache. The cache lives on disk and survives a kill (a resumed run rolls out only the missing shards).
``space: diffusion`` is the paper's ablation: the trajectories' final samples re-noised with fresh noise and the
teacher's velocity computed online (sCM on generated data). Details the paper leaves open are chosen and documented
in docs/consistency.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from fewstep.data.trajectories import lognormal_level_weights
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
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
from fewstep.objectives.consistency.trigflow import teacher_trig_velocity, trig_noise
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec


class TBCMConfig(SCMConfig):
    """Recipe block of ``tbcm``: the sCM settings plus the trajectory cache.

    ``guidance_scale`` (Imagen w) is the teacher's CFG in the rollouts (and the online velocity for
    ``space: diffusion``).
    """

    name: Literal["tbcm"] = "tbcm"  # type: ignore[assignment]
    cache_dir: str = Field(min_length=1, description="trajectory cache directory (resumable)")
    num_shards: int = Field(64, ge=1, description="shards to roll out before training, one per batch of prompts")
    rollout_steps: int = Field(28, ge=1, description="teacher sampling steps per trajectory")
    points_per_trajectory: int = Field(8, ge=1, description="trajectory points recorded per rollout")
    resolution: int | None = Field(None, ge=8, description="image size of the rollouts (None: the pipeline's)")
    space: Literal["generation", "diffusion"] = "generation"
    point_sampling: Literal["lognormal", "uniform"] = Field(
        "lognormal", description="trajectory points drawn to follow sCM's lognormal in tan u (p_mean, p_std)"
    )
    level_jitter: bool = Field(
        True, description="offset each shard's rollout grid by a random fraction of a step, so the cached levels "
        "cover time continuously (on one fixed grid the student's u-derivative is trained at rollout_steps angles "
        "only, and with 16 of them it degrades: docs/consistency.md)",
    )  # fmt: skip
    seed: int = Field(0, ge=0, description="seeds the rollout noise of shard k with (seed, k)")


@OBJECTIVES.register("tbcm")
class TBCM:
    """sCM on teacher trajectory caches.

    Args:
        config: the ``objective`` recipe block.
        teacher: a diffusers teacher (the rollouts need its latent shape).
        student: full or LoRA student (the adaptive weighting MLP is its ``auxiliary()`` module, as in ``scm``).
    """

    Config = TBCMConfig
    bypasses_prepared = True  # the JVP calls the backbone itself: the trainer averages gradients

    def __init__(self, config: TBCMConfig, teacher: Teacher, student: Student) -> None:
        check_teacher(teacher)
        if teacher.pipeline is None:
            raise ValueError("TBCM rolls out a diffusers teacher (its latent shape); this teacher has no pipeline.")
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else teacher.guidance_scale
        self.weighting = AdaptiveWeight() if config.adaptive_weighting else None
        self.pipeline_scheduler = pipeline_scheduler(teacher, config)
        from fewstep.models.backbones import latent_shape

        self.noise_shape = tuple(latent_shape(teacher, 1, config.resolution)[1:])
        self._cache = None
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def cache(self):
        """The ``TrajectoryCache`` in ``cache_dir/<hash of its settings>`` (opened on first use), so caches of
        different teachers or rollout settings never mix."""
        if self._cache is None:
            from fewstep.data.trajectories import TrajectoryCache

            cfg = self.config
            settings = {
                "teacher": str(getattr(self.teacher.pipeline, "name_or_path", "")),
                "family": self.teacher.family,
                "steps": cfg.rollout_steps,
                "points": cfg.points_per_trajectory,
                "w": self.guidance_scale,
                "shape": list(self.noise_shape),
                "seed": cfg.seed,
                "level_jitter": cfg.level_jitter,
            }
            key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
            self._cache = TrajectoryCache(Path(cfg.cache_dir) / key, settings)  # one subdirectory per setting
        return self._cache

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        """As ``scm``: the JVP goes through the backbone itself."""

    def auxiliary(self) -> dict[str, nn.Module]:
        """sCM's adaptive weighting ``w(u)``, trained by the student's optimizer (never sampled or exported)."""
        return {"student": self.weighting} if self.weighting is not None else {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Fill the trajectory cache: while it has fewer than ``num_shards`` shards, roll out shard ``k`` (its
        number in the cache) from the next batch's prompts. A full cache (a resume) takes no batch."""
        from fewstep.data.trajectories import make_shard

        cache, cfg = self.cache, self.config
        while cache.num_shards < cfg.num_shards:
            index = cache.num_shards
            shard = make_shard(self.teacher, next(batches), index, self.noise_shape, cfg.rollout_steps,
                               cfg.points_per_trajectory, self.guidance_scale, cfg.seed, cfg.level_jitter)  # fmt: skip
            cache.write(index, shard)

    def phase(self, step: int) -> str:
        return "student"

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """One sCM step on cached trajectory points (the batch gives only the batch size)."""
        cache, cfg = self.cache, self.config
        if cache.num_shards == 0:
            raise ValueError(
                f"The TBCM trajectory cache {str(cache.root)!r} is empty: call objective.prepare(batches) before the "
                "first loss (the trainer does) to roll out the teacher's trajectories."
            )
        n = batch.batch_size or 1
        weight = None
        if cfg.point_sampling == "lognormal":  # uniform points over-train high noise, where sCM is unstable
            weight = functools.partial(lognormal_level_weights, p_mean=cfg.p_mean, p_std=cfg.p_std)
        rows, cond = cache.sample(n, self.generator, weight)
        device = next(self.teacher.denoiser.parameters()).device
        cond = cond.to(device)
        if cfg.space == "generation":
            x, u, F_teacher = rows["x"].to(device), rows["u"].to(device), rows["F"].to(device)
        else:  # diffusion space: re-noise the trajectories' final samples, teacher velocity online
            x0 = rows["x0"].to(device)
            u = sample_u(n, self.schedule, cfg.p_mean, cfg.p_std).to(device)
            x = trig_noise(x0, u, torch.randn_like(x0))
            F_teacher = teacher_trig_velocity(self.teacher, x, u, cond, None, self.guidance_scale)
        loss, metrics = scm_update(self.student.denoiser, x, u, F_teacher, cond, cfg, step,
                                   self.weighting)  # fmt: skip
        metrics["cache_shards"] = float(cache.num_shards)
        return LossOutput(loss, metrics)

    def on_step_end(self, step: int, phase: str) -> None:
        """Nothing: θ⁻ = sg(θ)."""

    def sampler(self) -> SCMSampler:
        return trigflow_sampler(self.student.denoiser, self.schedule, self.config, self.pipeline_scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4, 8)) -> SamplingSpec:
        return trigflow_sampling_spec(self.sampler(), self.teacher, self.guidance_scale, "tbcm", steps)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""
