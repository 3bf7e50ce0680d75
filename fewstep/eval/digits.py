"""The digits benchmark (DESIGN §7): FID in a digits classifier's feature space and class accuracy of conditional
samples, on scikit-learn's 8×8 handwritten digits, in seconds on a CPU.

* ``DigitsClassifier`` is a small CNN trained by ``scripts/train_digits_classifier.py`` (shipped as the
  ``digits-classifier`` asset); its penultimate layer (64-d) is the feature space of the FID, its logits give the
  accuracy of class-conditional samples (the prompt-adherence analogue of CLIP score).
* ``DigitsMetrics`` computes both with torchmetrics' ``FrechetInceptionDistance`` around that feature network.
* ``digits_report`` samples every model at every step count from the same noise and labels, times it and returns
  ``DigitsRow``s; ``format_table`` prints them as markdown.

Images are ``[b, 1, 8, 8]`` floats in ``[0, 1]`` everywhere here (the range of ``decode_latents``); the digits
dataset and the teachers live in ``[-1, 1]``, so convert with ``(x + 1) / 2``. Values are clamped to ``[0, 1]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.eval.classifier import ImageClassifier

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)

# A model's sampler for the report: ``(noise [b,1,8,8], labels [b], num_steps, generator) -> images in [0, 1]``.
SampleFn = Callable[[Tensor, Tensor, int, torch.Generator], Tensor]


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


def digits_images(split: str = "train") -> tuple[Tensor, Tensor]:
    """All images of a digits split as ``([n, 1, 8, 8] in [0, 1], labels [n])``."""
    from fewstep.data.digits import DigitsDataset

    dataset = DigitsDataset(split=split)
    items = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([torch.as_tensor(img, dtype=torch.float32) for img, _ in items])
    labels = torch.tensor([int(label) for _, label in items])
    return (x + 1) / 2, labels


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


@dataclass
class DigitsRow:
    """One line of the digits table. ``seconds_per_1k_images`` is wall time of sampling only; ``preview`` holds the
    first images of the row (for sample grids), ``[k, 1, 8, 8]`` in ``[0, 1]``."""

    model: str
    num_steps: int | None
    fid: float
    accuracy: float
    seconds_per_1k_images: float | None
    num_images: int
    preview: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (no preview images), JSON-ready."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "preview"}


def report_noise(num_images: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The report's shared inputs: Gaussian noise ``[n, 1, 8, 8]`` and balanced labels ``0..9`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_images, *IMAGE_SHAPE, generator=generator)
    labels = torch.arange(num_images) % NUM_CLASSES
    return noise, labels


def digits_report(
    samplers: Mapping[str, SampleFn],
    steps: Mapping[str, Sequence[int]] | Sequence[int],
    metrics: DigitsMetrics | None = None,
    num_images: int = 1000,
    seed: int = 0,
    batch_size: int = 1000,
    data_row: bool = True,
    preview_images: int = 0,
) -> list[DigitsRow]:
    """Sample every model at its step counts from the same noise and labels; measure FID, accuracy and speed.

    Args:
        samplers: ``name -> fn(noise, labels, num_steps, generator) -> images [b, 1, 8, 8] in [0, 1]``.
        steps: step counts per model name, or one list for every model.
        metrics: the metric set (default: the shipped classifier, reference = the digits train split).
        num_images: images per row (labels cycle 0..9).
        seed: seeds the shared noise and each sampler's generator (same value for every row).
        batch_size: images per sampler call.
        data_row: first add a row for the held-out digits test split (the floor the models can reach).
        preview_images: keep this many images of each row in ``DigitsRow.preview``.

    Returns:
        One ``DigitsRow`` per (model, steps), in the order given.
    """
    metrics = metrics or DigitsMetrics()
    noise, labels = report_noise(num_images, seed)
    rows = []
    if data_row:
        test_images, test_labels = digits_images("test")
        rows.append(
            DigitsRow(
                "digits test split (real)",
                None,
                metrics.fid_to_reference(test_images),
                metrics.accuracy(test_images, test_labels),
                None,
                len(test_images),
            )
        )
    for name, fn in samplers.items():
        for num_steps in steps[name] if isinstance(steps, Mapping) else steps:
            generator = torch.Generator().manual_seed(seed + 1)
            start = time.perf_counter()
            with torch.no_grad():
                images = torch.cat(
                    [
                        fn(n, y, num_steps, generator).float().cpu()
                        for n, y in zip(noise.split(batch_size), labels.split(batch_size))
                    ]
                )
            seconds = time.perf_counter() - start
            rows.append(
                DigitsRow(
                    name,
                    num_steps,
                    metrics.fid_to_reference(images),
                    metrics.accuracy(images, labels),
                    seconds * 1000 / num_images,
                    num_images,
                    images[:preview_images].clamp(0, 1) if preview_images else None,
                )
            )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec) if math.isfinite(value) else str(value)


def format_table(rows: Sequence[DigitsRow], notes: Sequence[str] = ()) -> str:
    """The rows as a markdown table, followed by ``notes`` (one line each)."""
    lines = [
        "| model | steps | FID ↓ | accuracy ↑ | s / 1,000 images |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        steps = "–" if r.num_steps is None else str(r.num_steps)
        lines.append(
            f"| {r.model} | {steps} | {_fmt(r.fid, '.2f')} | {_fmt(r.accuracy, '.3f')} "
            f"| {_fmt(r.seconds_per_1k_images, '.2f')} |"
        )
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"
