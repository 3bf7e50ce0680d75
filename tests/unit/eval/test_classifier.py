"""``ImageClassifier`` for any image size, the digits classifier as one of its instances, the shipped classifiers and
the benchmark metrics built on them."""

from __future__ import annotations

import pytest
import torch

from fewstep.assets import asset_path
from fewstep.eval.classifier import (
    BENCHMARK_DATASETS,
    ImageClassifier,
    benchmark_dataset,
    classifier_benchmark_metrics,
    load_classifier,
)
from fewstep.eval.digits import DigitsClassifier, digits_images


@pytest.mark.parametrize(("channels", "size", "pooled"), [(1, 8, 2), (1, 28, 7), (3, 32, 8), (1, 6, 1)])
def test_any_size_and_channel_count(channels, size, pooled):
    model = ImageClassifier(channels, size, width=4, num_features=12, num_classes=5).eval()
    x = torch.randn(3, channels, size, size)
    assert model.features(x).shape == (3, 12) and model(x).shape == (3, 5)
    assert model.body[9].in_features == 2 * 4 * pooled * pooled  # two floor poolings
    assert model.image_shape == (channels, size, size)
    with pytest.raises(ValueError, match="image_size >= 4"):
        ImageClassifier(1, 3)


def test_preprocess_converts_range_and_channels_and_checks_size():
    grey, rgb = ImageClassifier(1, 8), ImageClassifier(3, 8)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(grey.preprocess(x), x.mean(1, keepdim=True) * 2 - 1)
    assert torch.equal(rgb.preprocess(x[:, :1]), (x[:, :1] * 2 - 1).expand(-1, 3, -1, -1))
    assert float(grey.preprocess(torch.full((1, 1, 8, 8), 2.0)).max()) == 1.0  # clamped to [0, 1] first
    with pytest.raises(ValueError, match=r"takes images \[b, 1, 8, 8\].*got shape \(2, 1, 28, 28\)"):
        grey.preprocess(torch.zeros(2, 1, 28, 28))


def test_save_load_round_trip_fp16_and_dropout(tmp_path):
    model = ImageClassifier(1, 28, width=4, num_features=8, dropout=0.5).eval()
    x = torch.randn(2, 1, 28, 28)
    model.save(tmp_path / "fp32", test_accuracy=0.5)
    loaded = ImageClassifier.load(tmp_path / "fp32")
    assert torch.equal(loaded(x), model(x)) and loaded.config["dropout"] == 0.5 and not loaded.training
    model.half().save(tmp_path / "fp16")
    half = ImageClassifier.load(tmp_path / "fp16")  # upcast on load
    assert next(half.parameters()).dtype == torch.float32
    assert torch.allclose(half(x), loaded(x), atol=5e-2)
    model.float().train()
    assert not torch.equal(model(x), model(x))  # dropout is active in training only
    with pytest.raises(FileNotFoundError, match="train_fashion_classifier.py"):
        ImageClassifier.load(tmp_path / "missing")


def test_digits_classifier_is_a_configured_image_classifier():
    digits = load_classifier("digits-classifier")
    assert isinstance(DigitsClassifier(), ImageClassifier) and digits.image_shape == (1, 8, 8)
    assert isinstance(DigitsClassifier.load(asset_path("digits-classifier")), DigitsClassifier)
    images, labels = digits_images("test")
    assert float((digits.predict(images) == labels).float().mean()) == 1.0  # the shipped weights load unchanged
    assert load_classifier("fewstep:digits-classifier").config == digits.config
    with pytest.raises(ValueError, match="Did you mean 'digits-classifier'"):
        load_classifier("digits-clasifier")
    with pytest.raises(FileNotFoundError, match="Classifier files not found"):
        load_classifier("./no/such/dir")


def test_benchmark_metrics_on_digits(tmp_path):
    assert sorted(BENCHMARK_DATASETS) == ["digits", "fashion_mnist"]
    assert benchmark_dataset("fashion").name == "fashion_mnist"
    fid, accuracy = classifier_benchmark_metrics("digits", cache_dir=tmp_path, progress=False)
    train, _ = digits_images("train")
    test, test_labels = digits_images("test")
    assert (fid.name, accuracy.name, fid.higher_is_better, accuracy.higher_is_better) == ("fid", "accuracy", 0, 1)
    on_train, on_test = fid.compute(train[:500]), fid.compute(test)
    assert 0 <= on_train < on_test and on_test > 1  # unseen digits are further from the train split
    assert fid.compute(torch.rand(200, 1, 8, 8)) > 10 * on_test  # noise is far away
    assert accuracy.compute(test, test_labels) == 1.0
    assert accuracy.compute(test, (test_labels + 1) % 10) == 0.0
    described = fid.describe()
    assert described["reference"]["id"] == "digits:train:seed0" and described["num_reference_images"] == 1617
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # the reference statistics are cached
    with pytest.raises(ValueError, match="benchmark data set"):
        benchmark_dataset("cifar10")
