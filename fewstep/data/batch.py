"""One training batch, as data sources yield it and objectives consume it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fewstep.models.conditioning import Conditioning


@dataclass
class Batch:
    """One training batch. ``x0`` is data in the denoiser's space (latents or pixels), ``None`` for data-free work.

    ``cond``/``uncond`` are the conditioning and its null counterpart for CFG (same batch size).
    """

    cond: Conditioning
    uncond: Conditioning | None = None
    x0: Tensor | None = None  # [b, c, h, w]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        if self.x0 is not None:
            return self.x0.shape[0]
        return int(self.cond.batch_size or 0)
