"""Diversity, k-NN precision / recall and the video metrics on synthetic features with known answers; the metrics
on real digits samples; the report's diversity check."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.eval.coverage import Diversity, diversity_check, precision_and_recall, subset_reference
from fewstep.eval.diversity import (
    diversity,
    group_diversity,
    group_ids,
    knn_radii,
    mean_pairwise_distance,
    precision_recall,
)
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.fid import frechet_distance
from fewstep.eval.metric import Metric
from fewstep.eval.report import EvalReport, Row, format_report
from fewstep.eval.video import frame_to_frame_distance, per_frame_fid, temporal_consistency


def gaussian(n: int, d: int = 8, seed: int = 0, center: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + center


def test_identical_samples_have_zero_diversity_and_spread_samples_more():
    same = gaussian(1).expand(6, -1)
    assert diversity(same) == 0.0 and mean_pairwise_distance(same) == 0.0
    # two points at distance 5 (a 3-4-5 triangle): the mean over one pair is 5
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    # mean over the 3 pairs of an equilateral unit triangle: 1
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert mean_pairwise_distance(triangle) == pytest.approx(1.0)
    wide, narrow = gaussian(50, seed=1) * 3, gaussian(50, seed=1)
    assert diversity(wide) == pytest.approx(3 * diversity(narrow))  # the distance scales with the features


def test_diversity_is_within_groups_not_across_them():
    """Group 0 collapsed to one point, group 1 spread: per-group values and their mean; the distance between the
    groups' centres does not count."""
    collapsed = torch.full((4, 2), 100.0)
    spread = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    features, groups = torch.cat([collapsed, spread]), torch.tensor([0, 0, 0, 0, 1, 1])
    assert group_diversity(features, groups) == {0: 0.0, 1: pytest.approx(5.0)}
    assert diversity(features, groups) == pytest.approx(2.5)
    assert diversity(features) > 50  # as one group the far-apart clusters dominate
    lonely = torch.tensor([0, 1, 2, 3, 4, 4])  # only group 4 has two samples
    assert diversity(features, lonely) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no prompt or class has 2 samples"):
        diversity(features, torch.arange(6))


def test_group_ids_from_labels_prompts_or_nothing():
    assert group_ids(labels=torch.tensor([3, 1, 3])).tolist() == [3, 1, 3]
    assert group_ids(prompts=["a cat", "a dog", "a cat", "a dog"]).tolist() == [0, 1, 0, 1]
    assert group_ids(num_samples=3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="labels, prompts or num_samples"):
        group_ids()


def test_precision_and_recall_of_a_set_against_itself_are_one():
    x = gaussian(200, d=16, seed=2)
    assert precision_recall(x, x) == (1.0, 1.0)
    with_duplicates = torch.cat([x[:50], x[:50]])  # zero radii still contain the point itself
    assert precision_recall(with_duplicates, with_duplicates) == (1.0, 1.0)


def test_a_missing_mode_costs_recall_and_an_off_manifold_set_costs_precision():
    """Real data: two well-separated clusters. A generator that covers one of them keeps its precision (every sample
    is realistic) and loses half the recall (half the real data is not covered)."""
    a, b = gaussian(200, d=2, seed=3), gaussian(200, d=2, seed=4, center=50.0)
    real = torch.cat([a, b])
    both = torch.cat([gaussian(200, d=2, seed=5), gaussian(200, d=2, seed=6, center=50.0)])
    one = torch.cat([gaussian(200, d=2, seed=5), gaussian(200, d=2, seed=6)])  # every sample in cluster a
    p_both, r_both = precision_recall(real, both)
    p_one, r_one = precision_recall(real, one)
    assert p_both > 0.95 and r_both > 0.95  # (k-NN balls of 200 samples cover ~97% of a 2-d Gaussian)
    assert p_one > 0.95 and r_one == pytest.approx(0.5, abs=0.02)
    far = gaussian(400, d=2, seed=7, center=25.0)  # between the clusters, on neither
    assert precision_recall(real, far) == (0.0, 0.0)


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    assert knn_radii(line, k=1).tolist() == [1.0, 1.0, 2.0, 4.0, 8.0]
    assert knn_radii(line, k=3).tolist() == [7.0, 6.0, 4.0, 7.0, 14.0]
    with pytest.raises(ValueError, match="more than 3 samples"):
        knn_radii(line[:3], k=3)


def test_frechet_distance_of_features():
    x = gaussian(400, d=4, seed=8)
    assert abs(frechet_distance(x, x)) < 1e-6
    shifted = frechet_distance(x, x + 2.0)  # mean shift only: |Δμ|² = 4 · 2² = 16
    assert shifted == pytest.approx(16.0, rel=1e-6)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(x, x[:, :3])


def test_video_metrics_on_synthetic_clips():
    """Clips [B, F, D]: a static clip has no frame-to-frame motion, a smooth one moves a fixed step per frame, a
    flickering one jumps around; per-frame FID of a clip set to itself is 0."""
    base = gaussian(3, d=5, seed=9)[:, None, :]  # [3, 1, 5]
    static = base.expand(3, 6, 5)
    steps = torch.arange(6.0)[None, :, None] * torch.tensor([0.6, 0.8, 0, 0, 0])  # 1.0 per frame
    smooth = base + steps
    flicker = base + torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(10)) * 4
    assert frame_to_frame_distance(static).tolist() == [0.0, 0.0, 0.0]
    assert frame_to_frame_distance(smooth) == pytest.approx(torch.ones(3, dtype=torch.float64))
    consistency = temporal_consistency(flicker, smooth)
    assert consistency["teacher"] == pytest.approx(1.0) and consistency["ratio"] > 3
    assert temporal_consistency(static, smooth)["ratio"] == 0.0  # a frozen student
    assert temporal_consistency(static, static)["ratio"] == 1.0
    clips = gaussian(4 * 8, d=3, seed=11).reshape(4, 8, 3)
    assert abs(per_frame_fid(clips, clips)) < 1e-6 and per_frame_fid(clips, clips + 1) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[B clips, F frames, D\]"):
        per_frame_fid(clips[0], clips)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_to_frame_distance(clips[:, :1])


class Flatten(torch.nn.Module):
    """Images [b, c, h, w] -> their pixels as features (a feature network for tests)."""

    num_features = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(len(images), -1)


def test_metrics_share_one_feature_pass_per_image_set():
    calls = []
    net = Flatten()
    net.register_forward_hook(lambda *args: calls.append(1))
    extractor = FeatureExtractor(net, batch_size=4)
    images = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(12))
    labels = torch.tensor([0, 1] * 4)
    metric = Diversity(extractor, by="labels")
    pool = torch.rand(30, 1, 2, 2, generator=torch.Generator().manual_seed(13))
    precision, recall = precision_and_recall(extractor, subset_reference(lambda: pool, extractor), "pool")
    assert all(isinstance(m, Metric) for m in (metric, precision, recall)) and metric.needs == {"labels"}
    value = metric.compute(images, labels=labels)
    assert len(calls) == 2  # 8 images in batches of 4
    p, r = precision.compute(images), recall.compute(images)
    assert len(calls) == 2 + 2  # the reference subset (8 of the 30, seeded) once; the row's features reused
    subset = pool[torch.randperm(30, generator=torch.Generator().manual_seed(0))[:8]]
    assert (p, r) == precision_recall(subset.reshape(8, -1), images.reshape(8, -1))
    flat = images.reshape(8, -1)
    assert value == pytest.approx(diversity(flat, labels))
    assert metric.describe()["groups"] == "class" and precision.describe()["k"] == 3
    with pytest.raises(ValueError, match="needs the labels"):
        metric.compute(images)


def row(model: str, steps: int | None, value: float) -> Row:
    return Row(model, steps, 10, None, None, None, {"diversity": value})


def test_diversity_check_flags_collapsed_students_against_the_teachers_most_steps():
    rows = [row("student", 1, 2.0), row("student", 4, 6.0), row("teacher", 4, 9.0), row("teacher", 50, 8.0)]
    models = {"student": {"kind": "student"}, "teacher": {"kind": "teacher"}}
    report = EvalReport(rows, {"models": models, "metrics": {"diversity": {"higher_is_better": True}}})
    record = diversity_check(report, min_ratio=0.7)
    assert record["reference"] == {"model": "teacher", "num_steps": 50, "diversity": 8.0}
    assert [r.metrics["diversity_ratio"] for r in rows] == [0.25, 0.75, 1.125, 1.0]
    assert record["flagged"] == [{"model": "student", "num_steps": 1, "ratio": 0.25}]
    (warning,) = report.info["warnings"]
    assert "student at 1 steps has 0.25 of the teacher's diversity" in warning
    md = format_report(report)
    assert "## Warnings" in md and "diversity_ratio ↑" in md
    assert diversity_check(EvalReport([row("student", 1, 2.0)], {"models": models})) is None  # no teacher row
