"""The Metric protocol: what the evaluation harness asks of FID, CLIP score, class accuracy and any user metric.

Images are ``[n, c, h, w]`` float tensors in ``[0, 1]`` (decoded samples), on the CPU. A metric says which inputs it
needs besides the images (``labels`` for class accuracy, ``prompts`` for CLIP score) and describes itself: the
``describe()`` dict goes into every report verbatim so that numbers are comparable (implementation and version,
feature network and its weights' hash, reference statistics, number of reference images).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

INPUTS = frozenset({"labels", "prompts"})


@runtime_checkable
class Metric(Protocol):
    name: str  # the report's column, e.g. "fid", "clip_score", "accuracy"
    needs: frozenset[str]  # a subset of INPUTS
    higher_is_better: bool

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        """The metric of one image set (``[n, c, h, w]`` in ``[0, 1]``)."""

    def describe(self) -> dict[str, Any]:
        """Everything that makes the number comparable, JSON-ready."""
