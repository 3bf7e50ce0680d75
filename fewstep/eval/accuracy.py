"""Class accuracy of class-conditional samples: the fraction a fixed classifier assigns to the asked label.

The prompt-adherence analogue of CLIP score for class-conditional models. Works with any classifier
whose ``forward`` returns logits ``[b, num_classes]`` (``DigitsClassifier``, the Fashion-MNIST classifier, ...) and
an input transform from images in ``[0, 1]`` to the classifier's input. ``classifier_metrics`` builds the pair
(feature-space FID, accuracy) such a classifier gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.eval.features import ClassifierFeatures, callable_name
from fewstep.eval.weights import module_sha256


class ClassAccuracy:
    """Top-1 accuracy of ``classifier(transform(images))`` against the conditioning labels.

    Args:
        classifier: a module returning logits ``[b, num_classes]``; frozen, eval mode.
        transform: images ``[b, c, h, w]`` in ``[0, 1]`` (clamped) → the classifier's input (default: identity).
        batch_size: images per classifier call.
        device: where the classifier runs.
        name: the report's column name.
        classifier_name: how reports name the classifier (default: its class name).
    """

    needs = frozenset({"labels"})
    higher_is_better = True

    def __init__(
        self,
        classifier: nn.Module,
        transform: Callable[[Tensor], Tensor] | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        name: str = "accuracy",
        classifier_name: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.classifier = classifier.eval().requires_grad_(False).to(self.device)
        self.transform = transform
        self.batch_size = batch_size
        self.name = name
        self.classifier_name = classifier_name or type(classifier).__name__
        self.num_images: int | None = None

    def predict(self, images: Tensor) -> Tensor:
        """Predicted classes ``[n]`` (CPU, long) of images ``[n, c, h, w]`` in ``[0, 1]``."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"Class accuracy takes images as a tensor [n, c, h, w] in [0, 1]; got {shape}.")
        predictions = []
        with torch.no_grad():
            for chunk in images.split(self.batch_size):
                x = chunk.to(self.device, torch.float32).clamp(0, 1)
                logits = self.classifier(self.transform(x) if self.transform is not None else x)
                predictions.append(logits.argmax(-1).cpu())
        return torch.cat(predictions)

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        """Fraction of ``images`` classified as their ``labels`` ``[n]`` (the labels they were sampled with)."""
        if labels is None:
            raise ValueError("Class accuracy needs the labels the images were sampled with: pass `labels=` ([n] ints).")
        labels = torch.as_tensor(labels).reshape(-1).to(torch.long).cpu()
        if len(labels) != len(images):
            raise ValueError(f"Class accuracy got {len(images)} images but {len(labels)} labels; they must match.")
        self.num_images = len(images)
        return float((self.predict(images) == labels).float().mean())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "implementation": "fewstep (top-1, micro average)",
            "classifier": self.classifier_name,
            "classifier_class": type(self.classifier).__qualname__,
            "classifier_sha256": module_sha256(self.classifier),
            "transform": callable_name(self.transform),
            "num_images": self.num_images,
        }


def classifier_metrics(
    classifier: nn.Module,
    transform: Callable[[Tensor], Tensor] | None,
    reference: Tensor | Callable[[], Tensor],
    reference_name: str,
    reference_id: str | None = None,
    name: str | None = None,
    **fid_kwargs: Any,
) -> tuple[Any, ClassAccuracy]:
    """The FID in a classifier's feature space and its class accuracy, e.g. for digits or Fashion-MNIST.

    Args:
        classifier: a module with ``features(x) -> [b, F]`` and ``forward(x) -> logits``.
        transform: images in ``[0, 1]`` → the classifier's input.
        reference: reference images ``[n, c, h, w]`` in ``[0, 1]`` (or a function returning them).
        reference_name: the reference set's name in reports.
        reference_id: the cache identity of a lazy ``reference``.
        name: the classifier's name in reports.
        fid_kwargs: more ``FID`` arguments (``cache_dir``, ``batch_size``, ``device``, ...).

    Returns:
        ``(FID, ClassAccuracy)``.
    """
    from fewstep.eval.fid import FID

    features = ClassifierFeatures(classifier, transform, name=name)
    fid = FID(features, reference, reference_name=reference_name, reference_id=reference_id, **fid_kwargs)
    accuracy = ClassAccuracy(classifier, transform, device=fid_kwargs.get("device", "cpu"), classifier_name=name)
    return fid, accuracy


__all__ = ["ClassAccuracy", "classifier_metrics"]
