"""``instaflow``: one-step distillation of a 2-rectified flow (InstaFlow), with
SlimFlow's flow-guided regulariser.

Liu et al. 2023 ("InstaFlow: One Step is Enough", ``gnobitab/InstaFlow``, no training code released); Zhu et al.
2024 (SlimFlow). The teacher is the 2-RF model (a ``reflow`` run exported as a pipeline); the student starts as it.
One step:

1. noise ``ε`` and the 2-RF ODE endpoint ``x̃0' = Φ_2RF(ε, c)``: from pairs written with the 2-RF model as teacher
   (``data.source: pairs``), or solved online with ``target_steps`` Euler steps when the batch has no pairs;
2. the one-step student ``G(ε) = x̂0(ε, τ = 1)`` (flow: ``ε − v(ε, 1)``);
3. ``d(G(ε), x̃0')`` (LPIPS as InstaFlow, or rfpp's pseudo-Huber for latents), plus SlimFlow's flow guidance
   ``λ·d(G(ε), Φ_2RF^{(k)}(ε))`` with a ``k``-step (default 2) solve of the 2-RF model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fewstep.models.backbones import num_tokens
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.objectives.losses import check_lpips_space, load_lpips, lpips_distance, pseudo_huber_distance
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.reflow.sampler import ReflowSampler
from fewstep.objectives.spec import SamplingSpec, deterministic_spec
from fewstep.solvers.grids import sampling_taus


class InstaFlowConfig(BaseModel):
    """Recipe block of the ``instaflow`` objective."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["instaflow"] = "instaflow"
    loss_type: Literal["l2", "pseudo_huber", "lpips"] = "pseudo_huber"
    huber_c: float | None = Field(None, gt=0.0, description="pseudo-Huber c; None: rfpp's 0.00054·d")
    lpips_weights: str | None = Field(None, description="TorchScript LPIPS file (loss_type: lpips)")
    target_steps: int = Field(25, ge=1, description="2-RF ODE steps when targets are solved online (no pairs)")
    flow_guidance_weight: float = Field(0.0, ge=0.0, description="SlimFlow λ of the k-step 2-RF guidance term")
    flow_guidance_steps: int = Field(2, ge=1, description="SlimFlow: k of the k-step 2-RF guidance target")
    sampler: Literal["noise_reuse", "euler"] = "noise_reuse"


@OBJECTIVES.register("instaflow")
class InstaFlow:
    """One-step distillation of a 2-RF teacher.

    Args:
        config: the ``objective`` recipe block.
        teacher: the 2-RF model (its guidance is baked in; ``teacher.guidance_scale`` is used for online targets).
        student: a copy of it (``student.kind: full``) or a LoRA on it.
    """

    Config = InstaFlowConfig
    bypasses_prepared = False

    def __init__(self, config: InstaFlowConfig, teacher: Teacher, student: Student) -> None:
        if teacher.schedule.kind not in ("vp", "flow"):
            raise ValueError(f"instaflow needs a VP or flow teacher; got a {teacher.schedule.kind!r} schedule.")
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        self.lpips: nn.Module | None = None
        if config.loss_type == "lpips":
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

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """The premetric ``d``, ``[b]``."""
        if self.config.loss_type == "lpips":
            return lpips_distance(self.lpips.to(a.device), a, b)
        if self.config.loss_type == "pseudo_huber":
            return pseudo_huber_distance(a, b, self.config.huber_c)
        return ((a.float() - b.float()) ** 2).flatten(1).mean(1)

    def solve_teacher(self, noise: Tensor, cond: Any, num_steps: int) -> Tensor:
        """The 2-RF ODE endpoint with ``num_steps`` deterministic steps (no gradients)."""
        taus = sampling_taus(self.schedule, num_steps, num_tokens(self.teacher.denoiser, noise.shape))
        return self.teacher.sample(noise, cond, taus.to(noise.device))

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """``d(G(ε), x̃0') [+ λ·d(G(ε), Φ^{(k)}(ε))]``."""
        cfg = self.config
        noise = batch.extra.get("noise")
        if noise is not None and batch.x0 is not None:
            noise, target = noise.float(), batch.x0.float()  # pairs written with the 2-RF model
        elif batch.x0 is not None:  # no pairs: the 2-RF ODE online, from fresh noise
            noise = torch.randn_like(batch.x0.float())
            target = self.solve_teacher(noise, batch.cond, cfg.target_steps)
        else:
            raise ValueError(
                "instaflow needs pairs from the 2-RF model (data.source: pairs) or a batch with x0 to size the noise."
            )
        ntok = num_tokens(self.teacher.denoiser, noise.shape)
        tau1 = sampling_taus(self.schedule, 1, ntok)[0].to(noise.device).expand(noise.shape[0])
        x0_hat = self._online(noise, tau1, batch.cond).x0  # G(ε): one step from the top level
        per_sample = self.distance(x0_hat, target)
        metrics = {"distill": float(per_sample.mean().detach())}
        if cfg.flow_guidance_weight > 0:  # SlimFlow flow-guided distillation
            guide = self.solve_teacher(noise, batch.cond, cfg.flow_guidance_steps)
            guidance_term = self.distance(x0_hat, guide)
            per_sample = per_sample + cfg.flow_guidance_weight * guidance_term
            metrics["flow_guidance"] = float(guidance_term.mean().detach())
        loss = per_sample.mean()
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def sampler(self) -> ReflowSampler:
        return ReflowSampler(self.student.denoiser, self.schedule, self.config.sampler)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"The instaflow objective keeps no state; got keys {sorted(state)}.")

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2)) -> SamplingSpec:
        return deterministic_spec(self.teacher, "instaflow", steps, self.config.sampler, recommended=1)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""
