"""The digits benchmark's metrics: FID in a digits classifier's feature space and class accuracy of conditional
samples, on scikit-learn's 8×8 handwritten digits, in seconds on a CPU.

* ``DigitsClassifier`` is a small CNN trained by ``scripts/train_digits_classifier.py`` (shipped as the
  ``digits-classifier`` asset); its penultimate layer (64-d) is the feature space of the FID, its logits give the
  accuracy of class-conditional samples (the prompt-adherence analogue of CLIP score).
* ``DigitsMetrics`` computes both with torchmetrics' ``FrechetInceptionDistance`` around that feature network, on any
  image tensors. Tables of sampled models come from the evaluation harness (``fewstep.eval.harness.evaluate`` with
  the ``fid`` and ``accuracy`` metrics of ``fewstep.eval.suite``; ``fewstep.eval.report.format_benchmark_table``).

Images are ``[b, 1, 8, 8]`` floats in ``[0, 1]`` everywhere here (the range of ``decode_latents``); the digits
dataset and the teachers live in ``[-1, 1]``, so convert with ``(x + 1) / 2``. Values are clamped to ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.data.digits import NUM_CLASSES, digits_images
from fewstep.eval.classifier import ImageClassifier

IMAGE_SHAPE = (1, 8, 8)
__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "DigitsClassifier", "DigitsMetrics", "digits_images", "to_model_range"]


class DigitsClassifier(ImageClassifier):
    """``fewstep.eval.classifier.ImageClassifier`` configured for 8×8 grey digits in ``[-1, 1]``: ``features``
    (``[b, num_features]``) and ``forward`` (logits); ``load`` reads the shipped ``digits-classifier`` asset.

    Args:
        width: channels of the first two convolutions (the third has ``2·width``).
        num_features: size of the penultimate layer, the FID feature space.
        num_classes: number of digit classes.
        **config: other ``ImageClassifier`` arguments (``in_channels``, ``image_size``, ``dropout``).
    """

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = NUM_CLASSES, **config: Any) -> None:
        config = {"in_channels": IMAGE_SHAPE[0], "image_size": IMAGE_SHAPE[1], **config}
        super().__init__(width=width, num_features=num_features, num_classes=num_classes, **config)


class _FeatureNet(nn.Module):
    """The classifier's features for torchmetrics' FID: takes images in ``[0, 1]``, has ``num_features``."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["num_features"]

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(to_model_range(images))


def to_model_range(images: Tensor) -> Tensor:
    """``[b, 1|3, 8, 8]`` images in ``[0, 1]`` (clamped; RGB averaged) → ``[b, 1, 8, 8]`` in ``[-1, 1]``."""
    images = images.float().clamp(0, 1)
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    if tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"Digits metrics take images [b, 1, 8, 8] in [0, 1]; got shape {tuple(images.shape)}.")
    return images * 2 - 1


class DigitsMetrics:
    """FID in the digits classifier's feature space and class accuracy.

    Args:
        classifier: a ``DigitsClassifier``, a directory written by its ``save``, or ``None`` for the shipped
            ``digits-classifier`` asset.
        reference_split: the digits split whose images are the FID reference set (``"train"``).
        batch_size: images per feature-network call.
    """

    def __init__(
        self,
        classifier: DigitsClassifier | str | Path | None = None,
        reference_split: str = "train",
        batch_size: int = 1000,
    ) -> None:
        if classifier is None:
            from fewstep.assets import asset_path

            classifier = asset_path("digits-classifier")
        if not isinstance(classifier, DigitsClassifier):
            classifier = DigitsClassifier.load(classifier)
        self.classifier = classifier.eval().requires_grad_(False)
        self.feature_net = _FeatureNet(self.classifier)
        self.reference_split = reference_split
        self.batch_size = batch_size
        self._reference_fid: Any = None

    @property
    def reference_name(self) -> str:
        return f"digits {self.reference_split} split"

    def _new_fid(self) -> Any:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise ImportError(
                "Digits FID needs torchmetrics: `pip install 'fewstep[eval]'` (or `pip install torchmetrics`)."
            ) from err
        return FrechetInceptionDistance(feature=self.feature_net, reset_real_features=False)

    def _update(self, fid: Any, images: Tensor, real: bool) -> None:
        with torch.no_grad():
            for chunk in images.split(self.batch_size):
                fid.update(chunk.float(), real=real)

    def fid(self, images_a: Tensor, images_b: Tensor) -> float:
        """Fréchet distance between two image sets (``[n, 1, 8, 8]`` in ``[0, 1]``, n ≥ 2 each)."""
        fid = self._new_fid()
        self._update(fid, images_a, real=True)
        self._update(fid, images_b, real=False)
        return float(fid.compute())

    def fid_to_reference(self, images: Tensor) -> float:
        """Fréchet distance of ``images`` to the reference split (its features are computed once)."""
        if self._reference_fid is None:
            self._reference_fid = self._new_fid()
            self._update(self._reference_fid, digits_images(self.reference_split)[0], real=True)
        self._reference_fid.reset()  # keeps the reference features (reset_real_features=False)
        self._update(self._reference_fid, images, real=False)
        return float(self._reference_fid.compute())

    def predict(self, images: Tensor) -> Tensor:
        """Predicted class ``[n]`` of images in ``[0, 1]``."""
        with torch.no_grad():
            return torch.cat([self.classifier(to_model_range(c)).argmax(-1) for c in images.split(self.batch_size)])

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` the classifier assigns to ``labels`` (class adherence of conditional samples)."""
        return float((self.predict(images) == labels.to(torch.long).cpu()).float().mean())
