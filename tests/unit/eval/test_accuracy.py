"""Class accuracy from any classifier's logits: exact fractions, the shipped digits classifier, errors, describe()."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from fewstep.assets import asset_path
from fewstep.eval.accuracy import ClassAccuracy, classifier_metrics
from fewstep.eval.digits import DigitsClassifier, DigitsMetrics, digits_images, to_model_range
from fewstep.eval.fid import FID
from fewstep.eval.metric import Metric


class BrightestQuadrant(nn.Module):
    """Logits = mean of each 2×2 quadrant of a 4×4 image: the class is the brightest quadrant (0..3)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.avg_pool2d(x[:, :1], 2).flatten(1)


def quadrant_images(classes: list[int]) -> Tensor:
    images = torch.zeros(len(classes), 1, 4, 4)
    for i, c in enumerate(classes):
        r, col = divmod(c, 2)
        images[i, 0, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2] = 1.0
    return images


def test_accuracy_is_the_exact_fraction_of_matching_predictions():
    metric = ClassAccuracy(BrightestQuadrant(), batch_size=3)
    images = quadrant_images([0, 1, 2, 3, 0, 1, 2, 3])
    assert metric.predict(images).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert metric.compute(images, labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])) == 1.0
    assert metric.compute(images, labels=torch.tensor([0, 1, 2, 3, 3, 3, 3, 3])) == 0.625
    assert metric.compute(images, labels=[1, 0, 3, 2, 1, 0, 3, 2]) == 0.0  # plain lists work too


def test_transform_is_applied_after_clamping():
    def invert(x: Tensor) -> Tensor:
        return 1 - x

    metric = ClassAccuracy(BrightestQuadrant(), transform=invert)
    images = quadrant_images([0, 3]) * 3 - 1  # outside [0, 1]: clamped first
    # Inverted, the marked quadrant is the darkest; argmax picks the first of the three bright ones.
    assert metric.predict(images).tolist() == [1, 0]


def test_shipped_digits_classifier_matches_digits_metrics():
    classifier = DigitsClassifier.load(asset_path("digits-classifier"))
    test, labels = digits_images("test")
    metric = ClassAccuracy(classifier, to_model_range, classifier_name="digits-classifier")
    assert isinstance(metric, Metric) and metric.needs == frozenset({"labels"}) and metric.higher_is_better
    value = metric.compute(test, labels)
    assert value > 0.9 and value == DigitsMetrics(classifier).accuracy(test, labels)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert metric.compute(test, shuffled) < 0.3


def test_missing_or_mismatched_labels_are_clear_errors():
    metric = ClassAccuracy(BrightestQuadrant())
    images = quadrant_images([0, 1])
    with pytest.raises(ValueError, match="needs the labels"):
        metric.compute(images)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        metric.compute(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[n, c, h, w\]"):
        metric.predict(images[0])


def test_describe_names_the_classifier_and_its_weights():
    metric = ClassAccuracy(BrightestQuadrant(), classifier_name="quadrants")
    metric.compute(quadrant_images([0, 1, 2]), torch.tensor([0, 1, 2]))
    info = metric.describe()
    assert info["name"] == "accuracy" and info["classifier"] == "quadrants" and info["num_images"] == 3
    assert info["classifier_class"] == "BrightestQuadrant" and len(info["classifier_sha256"]) == 64
    assert info["transform"] == "identity" and "top-1" in info["implementation"]
    json.dumps(info)


def test_classifier_metrics_pairs_fid_and_accuracy_on_one_classifier(tmp_path):
    classifier = DigitsClassifier.load(asset_path("digits-classifier"))
    test, labels = digits_images("test")
    fid, accuracy = classifier_metrics(
        classifier, to_model_range, test, "digits test split", name="digits-classifier", cache_dir=tmp_path
    )
    assert isinstance(fid, FID) and isinstance(accuracy, ClassAccuracy)
    assert fid.describe()["feature_network"]["weights_sha256"] == accuracy.describe()["classifier_sha256"]
    assert (
        fid.describe()["reference"]["name"] == "digits test split" and accuracy.classifier_name == "digits-classifier"
    )
    assert abs(fid.compute(test)) < 1e-4 and accuracy.compute(test, labels) > 0.9
