"""Distances that several objectives train with: the two pseudo-Huber forms and LPIPS.

* ``pseudo_huber``: elementwise ``sqrt((a − b)² + c²) − c`` (LCM / PCM training scripts); callers average it.
* ``pseudo_huber_distance``: per sample on the whole difference, ``(sqrt(‖a − b‖² + c²) − c) / d`` (rfpp's premetric,
  Lee et al. 2024, "Improving the Training of Rectified Flows"; the unnormalised form is iCT's).
* ``lpips_distance``: LPIPS on images upsampled to 224 px (rfpp's ``up224``) from a local TorchScript network.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.models.backbones import has_vae
from fewstep.models.teacher import Teacher

RFPP_HUBER_C = 0.00054  # rfpp: c = 0.00054·d with d the number of elements per sample
LPIPS_SIZE = 224


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Elementwise pseudo-Huber ``sqrt((a − b)² + c²) − c`` in float32: quadratic below ``c``, linear above.

    Args:
        a, b: ``[b, ...]`` (any matching shapes).
        c: the transition scale (LCM / PCM scripts: 0.001).

    Returns:
        ``[b, ...]``, the shape of ``a``; average it (``.mean()``, or ``.flatten(1).mean(1)`` per sample).
    """
    return torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c


def pseudo_huber_distance(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """rfpp's per-sample pseudo-Huber premetric ``(sqrt(‖a − b‖² + c²) − c) / d`` on the L2 norm of the difference.

    Args:
        a, b: ``[b, ...]``.
        c: the transition scale; default rfpp's ``0.00054·d`` (``d = a[0].numel()``, elements per sample).

    Returns:
        ``[b]`` float32.
    """
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
            "downloaded: export a TorchScript LPIPS once (see fewstep.objectives.losses.load_lpips) and set "
            "objective.lpips_weights to its path, or use loss_type: pseudo_huber."
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"objective.lpips_weights {str(file)!r} does not exist. Export a TorchScript LPIPS there (see "
            "fewstep.objectives.losses.load_lpips) or use loss_type: pseudo_huber."
        )
    net = torch.jit.load(str(file), map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def lpips_distance(net: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS between image batches ``[b, 1|3, h, w]`` in ``[-1, 1]`` upsampled to 224 px (rfpp's ``up224``); grey
    images are repeated to RGB. Returns ``[b]``."""

    def prep(x: Tensor) -> Tensor:
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)

    return net(prep(a), prep(b)).reshape(a.shape[0])


def check_lpips_space(teacher: Teacher) -> None:
    """Refuse LPIPS for a latent teacher: the loss compares images and does not decode latents."""
    if has_vae(teacher.pipeline):
        raise ValueError(
            "LPIPS compares images, but this teacher denoises VAE latents; fewstep does not decode inside the loss "
            "(decoding every step costs a VAE forward and backward). Use loss_type: pseudo_huber for latent teachers."
        )
