"""Diversity and coverage of generated samples, as pure functions on feature tensors ``[n, D]``.

Few-step students, distribution-matching ones above all, tend to collapse: the samples of one prompt or class look
alike whatever the seed. FID alone hides this when the average image is good, so fewstep measures it directly:

* ``diversity``: for each prompt or class (``groups``), the mean pairwise Euclidean distance between the features of
  its samples (different seeds, same conditioning), averaged over the groups. Identical samples give 0. Only the ratio
  to the teacher's diversity in the same feature space means something (the scale is the feature network's).
* ``precision_recall``: the improved precision and recall of Kynkäänniemi et al. (2019), "Improved Precision and
  Recall Metric for Assessing Generative Models": each set's manifold is the union of balls around its points with
  radius the distance to the point's k-th nearest neighbour in the same set (k = 3, Sec. 3). Precision is the
  fraction of generated samples inside the real manifold (quality); recall the fraction of real samples inside the
  generated manifold (coverage: a student that dropped modes loses recall, not precision).

``group_ids`` turns class labels or prompts into the group index of each sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

KNN_K = 3  # Kynkäänniemi et al. use k = 3 throughout
_CHUNK_ROWS = 1024  # rows of a distance matrix computed at once (bounds memory for 10k x 10k sets)


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ``[m, n]``, computed directly (not through ``|a|² + |b|² - 2ab``), so a point's distance to
    itself or to an identical point is exactly 0."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def group_ids(
    labels: Tensor | None = None, prompts: Sequence[str] | None = None, num_samples: int | None = None
) -> Tensor:
    """The group of each sample ``[n]`` (long): its class label, or the index of its prompt among the distinct
    prompts (in order of first appearance), or ``0`` for all ``num_samples`` when there is neither."""
    if labels is not None:
        return torch.as_tensor(labels).reshape(-1).long().cpu()
    if prompts is not None:
        index: dict[str, int] = {}
        return torch.tensor([index.setdefault(str(p), len(index)) for p in prompts], dtype=torch.long)
    if num_samples is None:
        raise ValueError("group_ids needs labels, prompts or num_samples.")
    return torch.zeros(num_samples, dtype=torch.long)


def _check_features(features: Tensor, what: str = "features") -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{what} must be a tensor [n, D]; got {shape}.")
    return features.detach().double().cpu()


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of ``features`` ``[n, D]`` (n ≥ 2)."""
    x = _check_features(features)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"A pairwise distance needs at least 2 samples; got {n}.")
    total = sum(float(_distances(chunk, x).sum()) for chunk in x.split(_CHUNK_ROWS))  # every ordered pair, i = j is 0
    return total / (n * (n - 1))


def group_diversity(features: Tensor, groups: Tensor) -> dict[int, float]:
    """``{group: mean pairwise distance of its samples}`` for every group with at least 2 samples.

    Args:
        features: ``[n, D]``.
        groups: ``[n]`` group index of each sample (``group_ids``).
    """
    x = _check_features(features)
    groups = torch.as_tensor(groups).reshape(-1).long().cpu()
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"Got {x.shape[0]} feature rows but {groups.shape[0]} group ids; they must match.")
    out = {}
    for g in torch.unique(groups).tolist():
        members = x[groups == g]
        if members.shape[0] >= 2:
            out[int(g)] = mean_pairwise_distance(members)
    return out


def diversity(features: Tensor, groups: Tensor | None = None) -> float:
    """The mean over groups of the mean pairwise feature distance within each group (``group_diversity``).

    Args:
        features: ``[n, D]``.
        groups: ``[n]`` group ids; ``None``: all samples form one group.

    Raises:
        ValueError: no group has 2 samples (nothing to compare: give each prompt or class several seeds).
    """
    if groups is None:
        groups = torch.zeros(features.shape[0], dtype=torch.long)
    per_group = group_diversity(features, groups)
    if not per_group:
        raise ValueError(
            "Diversity compares samples of the same prompt or class from different seeds, but no prompt or class has "
            "2 samples: use more images than prompts (e.g. --images-per-prompt 2) or classes."
        )
    return sum(per_group.values()) / len(per_group)


def knn_radii(features: Tensor, k: int = KNN_K) -> Tensor:
    """Distance from each point to its ``k``-th nearest neighbour in the same set (itself excluded): ``[n]``."""
    x = _check_features(features)
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples; got {x.shape[0]}.")
    radii = []
    for chunk in x.split(_CHUNK_ROWS):
        distances = _distances(chunk, x)  # [c, n]; each row holds its own 0 as the smallest entry
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_manifold(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    """Whether each query lies in at least one ball ``B(support_j, radii_j)`` (Kynkäänniemi et al., Eq. 1): ``[m]``
    bool."""
    q, s = _check_features(queries, "queries"), _check_features(support, "support")
    if q.shape[1] != s.shape[1]:
        raise ValueError(f"Feature sizes differ: queries {q.shape[1]}, support {s.shape[1]}.")
    r = radii.double().cpu()
    return torch.cat([(_distances(chunk, s) <= r[None]).any(dim=1) for chunk in q.split(_CHUNK_ROWS)])


def precision_recall(real: Tensor, fake: Tensor, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 2) of ``fake`` ``[m, D]`` against ``real``
    ``[n, D]``: precision = fraction of fake samples inside the real k-NN manifold, recall = fraction of real samples
    inside the fake k-NN manifold. Use sets of equal size (the radii depend on the density)."""
    real, fake = _check_features(real, "real features"), _check_features(fake, "fake features")
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


__all__ = [
    "KNN_K",
    "diversity",
    "group_diversity",
    "group_ids",
    "inside_manifold",
    "knn_radii",
    "mean_pairwise_distance",
    "precision_recall",
]
