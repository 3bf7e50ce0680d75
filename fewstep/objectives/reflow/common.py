"""Pieces the ``reflow`` and ``instaflow`` objectives share: rfpp's premetrics, the noise-reusing sampler and
SlimFlow's smaller student backbone; their export spec is ``fewstep.objectives.spec.deterministic_spec``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser, eval_mode
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import Schedule

RFPP_HUBER_C = 0.00054  # rfpp: c = 0.00054·d (d = elements per sample), ALGORITHMS §7.4
LPIPS_SIZE = 224


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """rfpp's per-sample pseudo-Huber premetric ``(sqrt(‖a − b‖² + c²) − c) / d`` with ``c = 0.00054·d`` by default
    (ALGORITHMS §7.4). ``a, b``: ``[b, ...]``; returns ``[b]``."""
    d = a[0].numel()
    c = RFPP_HUBER_C * d if c is None else c
    sq = ((a.float() - b.float()) ** 2).flatten(1).sum(1)
    return (torch.sqrt(sq + c**2) - c) / d


def load_lpips(path: str | None) -> nn.Module:
    """An LPIPS network from a local TorchScript file: ``net(a, b) -> [b]`` (or ``[b, 1, 1, 1]``) for images in
    ``[-1, 1]``. fewstep never downloads it (torchvision is not a dependency).

    Make the file once where ``lpips`` and torchvision work:
    ``torch.jit.trace(lpips.LPIPS(net="vgg").eval(), (x, x)).save("lpips_vgg.pt")`` with ``x = torch.zeros(1, 3,
    224, 224)``; then set ``objective.lpips_weights: lpips_vgg.pt``.
    """
    if path is None:
        raise ValueError(
            "objective.loss_type needs LPIPS but objective.lpips_weights is not set. LPIPS weights are never "
            "downloaded: export a TorchScript LPIPS once (see fewstep.objectives.reflow.common.load_lpips) and set "
            "objective.lpips_weights to its path, or use loss_type: pseudo_huber."
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"objective.lpips_weights {str(file)!r} does not exist. Export a TorchScript LPIPS there (see "
            "fewstep.objectives.reflow.common.load_lpips) or use loss_type: pseudo_huber."
        )
    net = torch.jit.load(str(file), map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def lpips_distance(net: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS between image batches in ``[-1, 1]`` upsampled to 224 px (rfpp's ``up224``); grey → RGB. ``[b]``."""

    def prep(x: Tensor) -> Tensor:
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)

    return net(prep(a), prep(b)).reshape(a.shape[0])


def check_lpips_space(teacher: Teacher) -> None:
    if getattr(teacher.pipeline, "vae", None) is not None:
        raise ValueError(
            "LPIPS compares images, but this teacher denoises VAE latents; fewstep does not decode inside the loss "
            "(ALGORITHMS §7 pitfalls). Use loss_type: pseudo_huber for latent teachers."
        )


def sampling_levels(schedule: Schedule, num_steps: int, noise: Tensor, offset: float = 0.0) -> Tensor:
    """``num_steps + 1`` levels: VP trailing, flow uniform through the schedule's shift (as the teacher solver);
    ``offset``: a jittered grid (``fewstep.objectives.diffusion.sampling_grid``)."""
    from fewstep.objectives.diffusion import sampling_grid

    return sampling_grid(schedule, num_steps, noise, offset).to(noise.device)


@dataclass
class ReflowSampler:
    """Samples a 2-RF / one-step student. ``noise_reuse`` is rfpp's new sampler: ``x_{τ'} = α(τ')·x̂0 + σ(τ')·z₁``
    with the **initial** noise ``z₁`` (exploits the deterministic coupling, ALGORITHMS §7.4); ``euler`` is the plain
    DDIM / Euler ODE step. Both are the same at one step. Guidance is baked into the pairs: no CFG here."""

    denoiser: Denoiser
    schedule: Schedule
    kind: str = "noise_reuse"

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        from fewstep.solvers.steps import ddim_step, noise_to

        taus = sampling_levels(self.schedule, num_steps, noise)
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


def smaller_backbone(backbone: nn.Module, overrides: dict[str, Any]) -> nn.Module:
    """SlimFlow's smaller student (ALGORITHMS §7.5): the teacher's diffusers class from its config with
    ``overrides`` (e.g. ``block_out_channels``), randomly initialised (it cannot start from the teacher)."""
    if not hasattr(type(backbone), "from_config"):
        raise ValueError(
            f"objective.student_backbone needs a diffusers backbone (it rebuilds the class from its config with the "
            f"overrides); got {type(backbone).__name__}. From Python pass `backbone=` (any module) instead."
        )
    unknown = sorted(set(overrides) - set(backbone.config))
    if unknown:
        raise ValueError(
            f"objective.student_backbone keys {unknown} are not in {type(backbone).__name__}'s config "
            f"(keys: {sorted(k for k in backbone.config if not k.startswith('_'))})."
        )
    param = next(backbone.parameters())
    small = type(backbone).from_config({**backbone.config, **overrides})
    return small.to(param.device).train().requires_grad_(True)  # from_config builds fp32 master weights


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
