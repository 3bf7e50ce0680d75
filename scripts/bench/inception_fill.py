"""TF-Inception FID for rows of the quality benchmark that are already measured, without training or re-evaluating
them (``python scripts/bench/quality.py --inception-only``), and the classifier metrics those rows lack.

A row's images are regenerated exactly as the harness drew them (``fewstep.eval.harness.sample_images``): the seed,
batch size, checkpoint and weights of its evaluation, read from ``eval.json`` in the row's ``eval_dir`` (without one:
``--seed``, ``--eval-batch-size``, the run's latest checkpoint), the same seeded noise and balanced labels. All of the
row's images are regenerated, not only the first N the Inception FID uses: the re-noising generator draws per batch,
so only whole batches reproduce, and the full set lets the classifier FID be checked against the row's stored ``fid``
(to ``CHECK_TOLERANCE``) before anything is written. A row that does not reproduce is skipped with a note.

The Inception reference is the first M train images. Their features are computed in chunks of
``REFERENCE_CHUNK_IMAGES`` cached on disk (``$FEWSTEP_CACHE/inception_reference/<network>-<data set>/``), so an
interrupted reference resumes where it stopped and a larger M reuses the chunks of a smaller one; the reference's
statistics are then cached by ``fewstep.eval.fid.FID`` like every FID's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REFERENCE_CHUNK_IMAGES = 500  # train images per cached feature chunk (~2 min of TF-Inception on 2 CPU cores)
CHECK_TOLERANCE = 1e-3  # |regenerated classifier FID - stored FID| above this: the row does not reproduce
INCEPTION_BATCH_IMAGES = 50
FILLED_METRICS = {"class_accuracy": "accuracy", "precision": "precision", "recall": "recall", "diversity": "diversity"}


def reference_images_count(dataset: str, num_images: int) -> int:
    """How many train images an Inception reference of ``num_images`` holds (at most the split's size)."""
    from fewstep.eval.classifier import benchmark_dataset

    return min(int(num_images), len(benchmark_dataset(dataset).images("train")[1]))


def inception_fid(dataset: str, num_reference_images: int, device: torch.device, net: Any = None) -> Any:
    """The ``fid_inception`` metric of a benchmark data set: TF-Inception FID (``InceptionFeatures``) against its first
    ``num_reference_images`` train images (fewer if the split is smaller), reference features cached in resumable
    chunks (``reference_features``) and statistics cached by ``FID``. ``net``: an ``InceptionFeatures`` to share."""
    from fewstep.eval.classifier import benchmark_dataset
    from fewstep.eval.features import FeatureExtractor, InceptionFeatures
    from fewstep.eval.fid import FID

    data, n = benchmark_dataset(dataset), reference_images_count(dataset, num_reference_images)
    extractor = FeatureExtractor(net if net is not None else InceptionFeatures(), INCEPTION_BATCH_IMAGES, device,
                                 progress=True)  # fmt: skip
    return FID(
        extractor, reference_features=lambda: reference_features(dataset, n, extractor), name="fid_inception",
        reference_name=f"{data.description}, first {n} train images",
        reference_id=f"{data.reference_id('train')}:first{n}",  # as the reference images were keyed before
    )  # fmt: skip


def reference_features(
    dataset: str,
    num_images: int,
    extractor: Any,
    cache_dir: Path | None = None,
    chunk_images: int = REFERENCE_CHUNK_IMAGES,
) -> Tensor:
    """Features ``[num_images, F]`` of the first train images of ``dataset``, chunk by chunk, each chunk cached on disk
    (``<cache_dir>/<feature fingerprint>-<data set hash>/<start>_<stop>.safetensors``) before the next starts."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from fewstep.data.image_folder import fewstep_cache_dir
    from fewstep.eval.classifier import benchmark_dataset

    data = benchmark_dataset(dataset)
    key = hashlib.sha256(data.reference_id("train").encode()).hexdigest()[:16]
    root = (cache_dir or fewstep_cache_dir() / "inception_reference") / f"{extractor.fingerprint()}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    images, out = None, []
    spans = [(s, min(s + chunk_images, num_images)) for s in range(0, num_images, chunk_images)]
    for start, stop in tqdm(spans, desc=f"{dataset} Inception reference", unit="chunk"):
        path = root / f"{start:06d}_{stop:06d}.safetensors"
        if path.is_file():
            out.append(load_file(path)["features"])
            continue
        if images is None:
            images = data.images("train")[0]
        features = extractor(images[start:stop], remember=False, desc=f"reference {start}-{stop}")
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"features": features.contiguous()}, tmp)
        tmp.replace(path)  # complete chunks only: an interrupted one is computed again
        out.append(features)
    return torch.cat(out)


@dataclass
class Regenerated:
    """A row's images as its evaluation drew them, with what the check compares."""

    images: Tensor  # [n, c, h, w] in [0, 1], 8-bit levels
    inputs: Any  # fewstep.eval.harness.EvalInputs of the n images
    stored_fid: float | None  # the row's classifier FID as evaluated (eval.json's full precision when available)
    source: dict[str, Any] = field(default_factory=dict)  # seed, batch size, checkpoint


def eval_report(record: dict[str, Any], out_dir: Path, root: Path) -> dict[str, Any] | None:
    """The ``eval.json`` the row came from: ``eval_dir`` as recorded (relative to the repository), else the directory
    of that name under ``<out-dir>/eval``; ``None`` when neither exists."""
    if not record.get("eval_dir"):
        return None
    recorded = Path(record["eval_dir"])
    for directory in (recorded if recorded.is_absolute() else root / recorded, out_dir / "eval" / recorded.name):
        if (directory / "eval.json").is_file():
            return json.loads((directory / "eval.json").read_text())
    return None


def stored_row(report: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any] | None:
    """The report row of ``record`` (same model and steps), if the report has it."""
    rows = (report or {}).get("rows", [])
    return next((r for r in rows if r["model"] == record["model"] and r["num_steps"] == record["steps"]), None)


def row_sampler(record: dict[str, Any], bench: Any, report: dict[str, Any] | None, args: argparse.Namespace) -> Any:
    """The harness ``Target`` that drew a student or teacher row, rebuilt: the recipe's run at the evaluated
    checkpoint and weights, or the teacher with the row's guidance scale.

    Raises:
        FileNotFoundError: the run directory (or its checkpoint) is missing.
    """
    from fewstep.eval.targets import run_target, teacher_target

    if record["kind"] == "teacher":
        w = record.get("guidance_scale")
        w = bench.cfg.teacher.guidance_scale if w is None and bench is not None else w
        return teacher_target(record["teacher"], steps=[record["steps"]], guidance_scale=w, device=args.device)
    run_dir = Path(bench.cfg.output_dir)
    if not (run_dir / "resolved_config.yaml").is_file():
        raise FileNotFoundError(f"no run at {run_dir}")
    target = (report or {}).get("target", {})
    checkpoint = Path(target["checkpoint"]).name if target.get("checkpoint") else "latest"
    if not (run_dir / "checkpoints" / checkpoint).is_dir():
        checkpoint = "latest"  # pruned or moved: the check below tells whether the latest one reproduces the row
    return run_target(run_dir, steps=[record["steps"]], teacher_steps=(), checkpoint=checkpoint,
                      weights=target.get("weights", "auto"), device=args.device)  # fmt: skip


def regenerate(record: dict[str, Any], bench: Any, args: argparse.Namespace, root: Path) -> Regenerated:
    """All of a row's images again: the test split for the ``data`` row, else its sampler from the same noise.

    Raises:
        FileNotFoundError: the row's run is missing.
        ValueError: the rebuilt sampler is not the row's model (another name).
    """
    from fewstep.eval.classifier import benchmark_dataset
    from fewstep.eval.harness import EvalInputs, sample_images, to_uint8

    report = eval_report(record, args.out_dir, root)
    stored = stored_row(report, record)
    stored_fid = stored["metrics"].get("fid") if stored else record.get("fid")
    n = int(record["num_images"])
    if record["kind"] == "data":
        images, labels = benchmark_dataset(record["dataset"]).images("test")
        quantised = to_uint8(images[:n]).float() / 255  # as fewstep.eval.harness.data_row measures it
        return Regenerated(quantised, EvalInputs(labels=labels[:n]), stored_fid, {"split": "test"})
    seed = int(report["seed"]) if report else args.seed
    batch_size = int(report["batch_size"]) if report else args.eval_batch_size
    target = row_sampler(record, bench, report, args)
    sampler = target.samplers[0]
    if sampler.name != record["model"]:
        raise ValueError(f"the rebuilt model is {sampler.name!r}, the row's is {record['model']!r}")
    inputs = target.inputs(n)
    images, _ = sample_images(sampler, record["steps"], inputs, seed=seed, batch_size=batch_size, device=args.device,
                              progress=True)  # fmt: skip
    source = {"seed": seed, "batch_size": batch_size, "from": "eval.json" if report else "the script's defaults",
              "model": target.info.get("checkpoint") or target.source}  # fmt: skip
    return Regenerated(images.float() / 255, inputs, stored_fid, source)


def check_reproduced(regenerated_fid: float, stored_fid: float | None) -> bool:
    """Whether the regenerated images give the row's classifier FID (to ``CHECK_TOLERANCE``); ``None``: unchecked."""
    return stored_fid is None or abs(regenerated_fid - stored_fid) <= CHECK_TOLERANCE


def missing_metrics(record: dict[str, Any]) -> list[str]:
    """The classifier metric fields (``FILLED_METRICS``) a row lacks."""
    return [name for name in FILLED_METRICS if record.get(name) is None]


def has_inception(record: dict[str, Any], num_images: int, num_reference_images: int) -> bool:
    """Whether the row already has an Inception FID at these image counts."""
    return (
        record.get("fid_inception") is not None
        and record.get("inception_images") == min(num_images, record["num_images"])
        and record.get("inception_reference_images") == num_reference_images
    )


__all__ = [
    "CHECK_TOLERANCE",
    "FILLED_METRICS",
    "REFERENCE_CHUNK_IMAGES",
    "Regenerated",
    "check_reproduced",
    "has_inception",
    "inception_fid",
    "missing_metrics",
    "reference_features",
    "reference_images_count",
    "regenerate",
]
