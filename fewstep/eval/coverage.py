"""Diversity and coverage as harness metrics, and the check that flags students that lost their teacher's diversity.

* ``Diversity`` (column ``diversity``): mean pairwise feature distance between samples of the same prompt or class
  (``fewstep.eval.diversity.diversity``), in the FID feature space (the benchmark classifier, or TF-Inception).
* ``Precision`` / ``Recall`` (columns ``precision``, ``recall``): Kynkäänniemi et al.'s k-NN manifold precision and
  recall (``fewstep.eval.diversity.precision_recall``, k = 3) against reference features: a seeded subset of the
  benchmark's train split as large as the generated set, or the teacher's samples.
* ``diversity_check(report, min_ratio)``: adds ``diversity_ratio`` (a row's diversity over the reference teacher's)
  to every row and flags students below ``min_ratio`` (a warning in the report and in ``eval.json``).

The metrics share the FID's ``FeatureExtractor``, so a row's features are computed once for all of them, and they
also take precomputed features (``compute_features``) for rows whose images are not at hand (a cached teacher).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fewstep.eval.diversity import KNN_K, diversity, group_diversity, group_ids, precision_recall
from fewstep.eval.features import FeatureExtractor

RATIO_COLUMN = "diversity_ratio"
DEFAULT_MIN_DIVERSITY_RATIO = 0.7


def _groups_by(by: str | None, n: int, labels: Tensor | None, prompts: Sequence[str] | None) -> Tensor | None:
    if by == "labels":
        if labels is None:
            raise ValueError("Diversity per class needs the labels the images were sampled with (`labels=`).")
        return group_ids(labels=labels)
    if by == "prompts":
        if prompts is None:
            raise ValueError("Diversity per prompt needs the prompts the images were sampled with (`prompts=`).")
        return group_ids(prompts=prompts)
    return None


class Diversity:
    """Mean pairwise feature distance between samples of one prompt or class, averaged over prompts / classes.

    Args:
        extractor: the feature space (share the FID's: ``fid.extractor``).
        by: ``"labels"`` (class-conditional), ``"prompts"`` (text) or ``None`` (all samples are one group).
        name: the report's column name.
    """

    higher_is_better = True

    def __init__(self, extractor: FeatureExtractor, by: str | None = None, name: str = "diversity") -> None:
        if by not in ("labels", "prompts", None):
            raise ValueError(f"by must be 'labels', 'prompts' or None; got {by!r}.")
        self.extractor, self.by, self.name = extractor, by, name
        self.needs = frozenset({by}) if by else frozenset()
        self.num_groups: int | None = None

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        """Diversity of ``images`` ``[n, c, h, w]`` in ``[0, 1]`` grouped by their labels / prompts."""
        return self.compute_features(self.extractor(images), labels, prompts)

    def compute_features(
        self, features: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> float:
        """Diversity of precomputed features ``[n, F]`` of this feature space; NaN when no prompt or class has two
        samples (fewer images than prompts or classes: nothing to compare)."""
        groups = _groups_by(self.by, len(features), labels, prompts)
        self.num_groups = int(torch.unique(groups).numel()) if groups is not None else 1
        if not group_diversity(features, groups if groups is not None else torch.zeros(len(features))):
            return math.nan
        return diversity(features, groups)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "implementation": "fewstep.eval.diversity (mean pairwise Euclidean feature distance within a group)",
            "groups": {"labels": "class", "prompts": "prompt", None: "all samples"}[self.by],
            "num_groups": self.num_groups,
            "feature_network": self.extractor.describe(),
        }


class ManifoldPrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of image sets against reference features; the
    ``Precision`` and ``Recall`` metrics share one, so each row's k-NN balls are computed once.

    Args:
        extractor: the feature space (share the FID's).
        reference: ``n -> reference features [m, F]`` for ``n`` generated samples (the same size is best: the radii
            depend on the density).
        reference_name: how reports name the reference.
        k: the neighbour whose distance is a point's radius (3 in the paper).
    """

    def __init__(
        self, extractor: FeatureExtractor, reference: Callable[[int], Tensor], reference_name: str, k: int = KNN_K
    ) -> None:
        self.extractor, self.reference, self.reference_name, self.k = extractor, reference, reference_name, k
        self._last: tuple[weakref.ref[Tensor], tuple[float, float]] | None = None
        self.num_reference: int | None = None

    def values(self, features: Tensor) -> tuple[float, float]:
        """``(precision, recall)`` of generated features ``[n, F]``."""
        if self._last is not None and self._last[0]() is features:
            return self._last[1]
        real = self.reference(len(features))
        self.num_reference = len(real)
        result = precision_recall(real, features, self.k)
        self._last = (weakref.ref(features), result)
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "implementation": "fewstep.eval.diversity (Kynkäänniemi et al. 2019, k-NN manifolds)",
            "k": self.k,
            "reference": self.reference_name,
            "num_reference_samples": self.num_reference,
            "feature_network": self.extractor.describe(),
        }


class _ManifoldMetric:
    needs: frozenset[str] = frozenset()
    higher_is_better = True
    index = 0
    self_value: float | None = None  # 1.0 when the reference is a teacher's samples: that teacher's own row

    def __init__(self, core: ManifoldPrecisionRecall, name: str) -> None:
        self.core, self.name = core, name

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        return self.compute_features(self.core.extractor(images))

    def compute_features(
        self, features: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> float:
        return self.core.values(features)[self.index]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.core.describe()}


class Precision(_ManifoldMetric):
    """Fraction of generated samples inside the reference's k-NN manifold (sample quality)."""

    index = 0


class Recall(_ManifoldMetric):
    """Fraction of reference samples inside the generated samples' k-NN manifold (coverage of the modes)."""

    index = 1


def precision_and_recall(
    extractor: FeatureExtractor, reference: Callable[[int], Tensor], reference_name: str, k: int = KNN_K
) -> tuple[Precision, Recall]:
    """The ``precision`` and ``recall`` metrics, sharing one computation per row."""
    core = ManifoldPrecisionRecall(extractor, reference, reference_name, k)
    return Precision(core, "precision"), Recall(core, "recall")


def subset_reference(
    images: Callable[[], Tensor], extractor: FeatureExtractor, seed: int = 0
) -> Callable[[int], Tensor]:
    """``n ->`` features of ``n`` reference images drawn without replacement by a seeded permutation (all of them
    when there are fewer); each size is computed once."""
    cache: dict[int, Tensor] = {}

    def reference(n: int) -> Tensor:
        if n not in cache:
            pool = images()
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
            cache[n] = extractor(pool[order], remember=False, desc="reference features")
        return cache[n]

    return reference


# ---------------------------------------------------------------------------------------------------------------------
# The diversity check of a report
# ---------------------------------------------------------------------------------------------------------------------


def _reference_row(report: Any, reference: tuple[str, int | None] | None, metric: str) -> Any:
    """The row the ratios are taken against: ``reference`` (model, steps), else the teacher row with the most steps."""
    rows = [r for r in report.rows if math.isfinite(r.metrics.get(metric, math.nan))]
    if reference is not None:
        return next((r for r in rows if (r.model, r.num_steps) == tuple(reference)), None)
    models = report.info.get("models", {})
    teachers = [r for r in rows if models.get(r.model, {}).get("kind") == "teacher" and r.num_steps is not None]
    return max(teachers, key=lambda r: r.num_steps) if teachers else None


def diversity_check(
    report: Any,
    min_ratio: float = DEFAULT_MIN_DIVERSITY_RATIO,
    reference: tuple[str, int | None] | None = None,
    metric: str = "diversity",
) -> dict[str, Any] | None:
    """Add ``diversity_ratio`` (row diversity / the reference teacher's) to every row with a diversity and flag the
    student rows below ``min_ratio``.

    Args:
        report: an ``EvalReport`` (before it is written: pass ``lambda r: diversity_check(r, ...)`` as
            ``evaluate(finish=...)``).
        min_ratio: students below this fraction of the teacher's diversity are flagged.
        reference: ``(model, steps)`` of the reference row; default: the teacher row with the most steps.
        metric: the diversity column.

    Returns:
        The check's record (also in ``report.info["diversity_check"]``), or ``None`` when the report has no
        diversity or no teacher row to compare with.
    """
    base = _reference_row(report, reference, metric)
    if base is None or not base.metrics.get(metric):
        return None
    models = report.info.get("models", {})
    flagged = []
    for row in report.rows:
        if not math.isfinite(row.metrics.get(metric, math.nan)):
            continue
        ratio = row.metrics[metric] / base.metrics[metric]
        row.metrics[RATIO_COLUMN] = ratio
        if models.get(row.model, {}).get("kind") == "student" and ratio < min_ratio:
            flagged.append({"model": row.model, "num_steps": row.num_steps, "ratio": ratio})
    record = {
        "reference": {"model": base.model, "num_steps": base.num_steps, metric: base.metrics[metric]},
        "min_ratio": min_ratio,
        "flagged": flagged,
    }
    report.info["diversity_check"] = record
    report.info.setdefault("metrics", {})[RATIO_COLUMN] = {
        "higher_is_better": True,
        "name": RATIO_COLUMN,
        "formula": f"{metric} of the row / {metric} of {base.model} at {base.num_steps} steps",
        "min_ratio": min_ratio,
    }
    warnings = report.info.setdefault("warnings", [])
    for f in flagged:
        warnings.append(
            f"low diversity: {f['model']} at {f['num_steps']} steps has {f['ratio']:.2f} of the teacher's diversity "
            f"(below {min_ratio:g}; the samples of one prompt or class look alike across seeds: mode collapse)"
        )
    return record


__all__ = [
    "DEFAULT_MIN_DIVERSITY_RATIO",
    "RATIO_COLUMN",
    "Diversity",
    "ManifoldPrecisionRecall",
    "Precision",
    "Recall",
    "diversity_check",
    "precision_and_recall",
    "subset_reference",
]
