"""The sampler of reflow and InstaFlow students: rfpp's noise-reusing sampler or plain DDIM / Euler steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser, eval_mode
from fewstep.noise.schedules import Schedule
from fewstep.solvers.grids import sampling_taus
from fewstep.solvers.steps import ddim_step, noise_to


@dataclass
class ReflowSampler:
    """Samples a 2-RF / one-step student. ``noise_reuse`` is rfpp's new sampler: ``x_{τ'} = α(τ')·x̂0 + σ(τ')·z₁``
    with the **initial** noise ``z₁`` (it exploits the deterministic noise-data coupling of the pairs); ``euler`` is
    the plain DDIM / Euler ODE step. Both are the same at one step. Guidance is baked into the pairs: no CFG here."""

    denoiser: Denoiser
    schedule: Schedule
    kind: str = "noise_reuse"

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = sampling_taus(self.schedule, num_steps, num_tokens(self.denoiser, noise.shape)).to(noise.device)
        cond = cond.to(noise.device)
        x = noise.float()
        with torch.no_grad(), eval_mode(self.denoiser):
            for i in range(num_steps):
                tau, nxt = taus[i].expand(x.shape[0]), taus[i + 1].expand(x.shape[0])
                pred = self.denoiser(x, tau, cond)
                x = (
                    ddim_step(self.schedule, pred, nxt)
                    if self.kind == "euler"
                    else noise_to(self.schedule, pred.x0, noise.float(), nxt)
                )
        return x
