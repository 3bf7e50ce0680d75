"""A small CNN image classifier for the real-data benchmarks: its penultimate layer is the feature space of a fast
FID, its logits give the class accuracy of class-conditional samples (the analogue of CLIP score).

One architecture for any image size and channel count: two 3×3 convolutions at full resolution, 2×2 max-pool, a
3×3 convolution with twice the channels, 2×2 max-pool (floor: 28 → 14 → 7, 8 → 4 → 2), then ``Linear → GELU``
to ``num_features`` (the FID features) and a linear head. The shipped instances:

=======================  ==============  ==========  =====================================================
asset                    images          features    trained by
=======================  ==============  ==========  =====================================================
``digits-classifier``    ``[1, 8, 8]``   64          ``python scripts/train_digits_classifier.py``
``fashion-classifier``   ``[1, 28, 28]`` 128         ``python scripts/train_fashion_classifier.py``
=======================  ==============  ==========  =====================================================

The network takes images in ``[-1, 1]``; ``preprocess`` turns the metrics' ``[0, 1]`` images (clamped, RGB
averaged to grey or grey repeated to RGB) into that range and checks the size. ``classifier_benchmark_metrics``
builds the benchmark's ``fid`` and ``accuracy`` metrics (``fewstep.eval.fid.FID``, ``fewstep.eval.accuracy``) for a
data set of ``BENCHMARK_DATASETS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_KEYS = ("in_channels", "image_size", "width", "num_features", "num_classes", "dropout")
TRAIN_COMMANDS = ("python scripts/train_digits_classifier.py", "python scripts/train_fashion_classifier.py")


class ImageClassifier(nn.Module):
    """A small CNN on ``[b, in_channels, image_size, image_size]`` images in ``[-1, 1]``.

    Args:
        in_channels: image channels (1 for grey).
        image_size: height = width of the images (any size ≥ 4; pooled twice with floor).
        width: channels of the first two convolutions (the third has ``2·width``).
        num_features: size of the penultimate layer, the FID feature space.
        num_classes: number of classes (logits).
        dropout: dropout on the features before the head, during training only.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        width: int = 32,
        num_features: int = 64,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"ImageClassifier needs image_size >= 4 (it pools twice), got {image_size}.")
        self.config = {
            "in_channels": in_channels, "image_size": image_size, "width": width, "num_features": num_features,
            "num_classes": num_classes, "dropout": dropout,
        }  # fmt: skip
        pooled = image_size // 4
        self.body = nn.Sequential(  # the module indices match the shipped digits-classifier weights
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # [b, w, s/2, s/2]
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # [b, 2w, s/4, s/4]
            nn.Flatten(),
            nn.Linear(2 * width * pooled * pooled, num_features),
            nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    @property
    def num_features(self) -> int:
        return int(self.config["num_features"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the inputs."""
        size = int(self.config["image_size"])
        return int(self.config["in_channels"]), size, size

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[b, num_features]`` of images ``[b, c, s, s]`` in ``[-1, 1]``."""
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[b, num_classes]`` of images ``[b, c, s, s]`` in ``[-1, 1]``."""
        return self.head(F.dropout(self.features(x), float(self.config["dropout"]), self.training))

    def preprocess(self, images: Tensor) -> Tensor:
        """Images ``[b, 1|3, s, s]`` in ``[0, 1]`` (clamped) → the network's ``[b, c, s, s]`` in ``[-1, 1]``.

        Raises:
            ValueError: if the spatial size is not the classifier's (the message gives both shapes).
        """
        images = images.float().clamp(0, 1)
        channels, size, _ = self.image_shape
        if images.ndim == 4 and images.shape[1] != channels:
            if images.shape[1] == 3 and channels == 1:
                images = images.mean(dim=1, keepdim=True)
            elif images.shape[1] == 1:
                images = images.expand(-1, channels, -1, -1)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"This classifier takes images [b, {channels}, {size}, {size}] (or [b, 1|3, {size}, {size}]) in "
                f"[0, 1]; got shape {tuple(images.shape)}. Resize the samples or use the classifier of their data set."
            )
        return images * 2 - 1

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Predicted classes ``[n]`` of images in ``[0, 1]``."""
        return torch.cat([self(self.preprocess(c)).argmax(-1) for c in images.split(batch_size)]).cpu()

    def save(self, directory: str | Path, **info: Any) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (the architecture plus any ``info``) to ``directory``.

        Args:
            directory: created if missing.
            info: JSON-ready provenance (accuracy, data, command, seed) stored next to the architecture.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps({**self.config, **info}, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ImageClassifier:
        """Load a classifier written by ``save`` (fp32, frozen, eval mode). fp16 files are upcast."""
        from safetensors.torch import load_file

        directory = Path(directory)
        files = [directory / "config.json", directory / "model.safetensors"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Classifier files not found: {', '.join(missing)}. Pass the directory written by "
                f"ImageClassifier.save, or rebuild a shipped one with `{TRAIN_COMMANDS[0]}` (digits) or "
                f"`{TRAIN_COMMANDS[1]}` (Fashion-MNIST)."
            )
        config = json.loads(files[0].read_text())
        model = cls(**{k: config[k] for k in CONFIG_KEYS if k in config})
        model.load_state_dict({k: v.float() for k, v in load_file(files[1]).items()})
        return model.eval().requires_grad_(False)


def load_classifier(spec: str | Path | ImageClassifier) -> ImageClassifier:
    """A classifier from a shipped asset name (``digits-classifier``, ``fashion-classifier``, optionally prefixed
    ``fewstep:``), a directory written by ``save``, or an instance (returned frozen)."""
    if isinstance(spec, ImageClassifier):
        return spec.eval().requires_grad_(False)
    text = str(spec)
    if not Path(text).exists() and "/" not in text:
        from fewstep.assets import asset_path

        return ImageClassifier.load(asset_path(text.removeprefix("fewstep:")))
    return ImageClassifier.load(text)


@dataclass(frozen=True)
class BenchmarkDataset:
    """A real-data benchmark set: its classifier asset and its image splits.

    Attributes:
        name: the data set's name (``data.source`` of its recipes).
        classifier: the shipped classifier asset whose features and logits give the FID and the accuracy.
        image_shape: one image, ``(c, h, w)``.
        num_classes: labels ``0..num_classes-1``.
        images: ``split -> ([n, c, h, w] in [0, 1], labels [n])`` (``"train"``, ``"test"``).
        reference_id: ``split ->`` what identifies those images in the FID statistics cache.
        description: how reports name it.
    """

    name: str
    classifier: str
    image_shape: tuple[int, int, int]
    num_classes: int
    images: Callable[[str], tuple[Tensor, Tensor]]
    reference_id: Callable[[str], str]
    description: str


def _digits_images(split: str) -> tuple[Tensor, Tensor]:
    from fewstep.data.digits import digits_images

    return digits_images(split)


def _fashion_images(split: str) -> tuple[Tensor, Tensor]:
    from fewstep.data.fashion import fashion_images

    return fashion_images(split)


def _fashion_reference_id(split: str) -> str:
    """The directory and the images file's size and mtime: another copy (or a small test set) is another id."""
    from fewstep.data.fashion import fashion_mnist_dir, split_files

    directory = fashion_mnist_dir(split=split)
    images = split_files(directory, split)[0]
    stat = images.stat()
    return f"fashion_mnist:{split}:{images.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


BENCHMARK_DATASETS = {
    "digits": BenchmarkDataset(
        "digits", "digits-classifier", (1, 8, 8), 10, _digits_images, lambda split: f"digits:{split}:seed0",
        "scikit-learn digits (fewstep.data.digits, seeded 90/10 split)",
    ),
    "fashion_mnist": BenchmarkDataset(
        "fashion_mnist", "fashion-classifier", (1, 28, 28), 10, _fashion_images, _fashion_reference_id,
        "Fashion-MNIST (fewstep.data.fashion, the standard 60k/10k split)",
    ),
}  # fmt: skip


def benchmark_dataset(name: str) -> BenchmarkDataset:
    """The ``BenchmarkDataset`` called ``name`` (``digits``, ``fashion_mnist``; ``fashion`` is accepted)."""
    key = {"fashion": "fashion_mnist", "fashion-mnist": "fashion_mnist"}.get(name, name)
    if key not in BENCHMARK_DATASETS:
        from fewstep.registry import unknown_name_message

        raise ValueError(unknown_name_message("benchmark data set", name, sorted(BENCHMARK_DATASETS)))
    return BENCHMARK_DATASETS[key]


def classifier_benchmark_metrics(
    dataset: str,
    reference_split: str = "train",
    classifier: str | Path | ImageClassifier | None = None,
    device: str | torch.device = "cpu",
    **fid_kwargs: Any,
) -> list[Any]:
    """The benchmark's classifier metrics of ``dataset``: ``fid`` (Fréchet distance in the classifier's penultimate
    feature space to the ``reference_split`` images; reference statistics cached on disk) and ``accuracy`` (class
    accuracy of the samples against their conditioning labels).

    Args:
        dataset: ``digits`` or ``fashion_mnist``.
        reference_split: the split whose images are the FID reference (``train``: the data the teachers learned).
        classifier: default: the data set's shipped classifier asset.
        device: where the classifier runs.
        fid_kwargs: more ``fewstep.eval.fid.FID`` arguments (``cache_dir``, ``use_cache``, ``batch_size``, ...).

    Returns:
        ``[FID, ClassAccuracy]`` (``fewstep.eval.metric.Metric`` objects).
    """
    from fewstep.eval.accuracy import classifier_metrics

    data = benchmark_dataset(dataset)
    model = load_classifier(classifier if classifier is not None else data.classifier).to(device)
    if classifier is None:
        source = data.classifier
    else:
        source = type(classifier).__name__ if isinstance(classifier, ImageClassifier) else str(classifier)
    name = f"{source} ({model.num_features}-d penultimate features)"
    fid, accuracy = classifier_metrics(
        model, model.preprocess, lambda: data.images(reference_split)[0], f"{data.description}, {reference_split}",
        reference_id=data.reference_id(reference_split), name=name, device=device, **fid_kwargs,
    )  # fmt: skip
    return [fid, accuracy]
