"""The teacher's own samples as the reference of a distilled student: FID against them (distillation fidelity, when no
reference image set is at hand), the teacher's diversity next to the student's, precision / recall against them.

``TeacherReference`` samples the teacher once on the evaluation's prompts (or labels) and seeds, exactly as the
harness samples a row (``fewstep.eval.harness.sample_images``: the same noise, inputs and generator), at its usual steps
and guidance, and keeps what later evaluations need, on disk under ``$FEWSTEP_CACHE/teacher_samples/<key>``:

* ``<key>.safetensors``: the samples' features in the FID feature space ``[n, F]``, their groups (prompt index or
  class) ``[n]``, and the first ``PREVIEW_IMAGES`` images (uint8) for the report's grids;
* ``<key>.json``: the key's fields, NFE, the sampling time, and the values of metrics that need the images themselves
  (CLIP score), each under its name and a hash of its description (another CLIP model is another entry).

The key hashes everything that changes the samples or their features: the teacher (its source and the sha256 of its
denoiser's weights, LoRA adapters excluded), every image's prompt or label in order (so the prompts, their number and
the images per prompt), an image-to-video teacher's first frames, the seed, steps, guidance scale and solver, the noise
shape (the image size) and the feature network's fingerprint. A second evaluation with the same key reads the file and
samples nothing. The text encoder is identified by the teacher's source only: replace a local teacher's text encoder
in place and the cache is stale (delete the file, or pass ``use_cache=False``). A video teacher's clips are kept frame
by frame (``fewstep.eval.harness.frames_of``): ``n·f`` features and groups.

Sample the reference before the student rows (``load()`` before ``evaluate``): a LoRA student is merged into the
shared base while its rows are sampled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from fewstep.eval.diversity import group_ids
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.harness import EvalInputs, Sampler, compute_metrics, frames_of, per_frame, sample_images
from fewstep.eval.metric import Metric
from fewstep.eval.report import Row, jsonable
from fewstep.eval.weights import module_sha256

CACHE_VERSION = 1  # bump when the cached files change meaning
PREVIEW_IMAGES = 16
REFERENCE_SUFFIX = " · reference"


@dataclass
class ReferenceSamples:
    """The teacher's samples as features.

    Attributes:
        features: ``[n, F]`` float64 in the FID feature space.
        groups: ``[n]`` prompt index or class of each sample (``fewstep.eval.diversity.group_ids``).
        preview: the first images ``[k, c, h, w]`` uint8.
        info: the key's fields, NFE per image, seconds per image of the sampling, cached metric values.
        path: the cache file (``None``: not cached).
        cache_hit: read from the cache rather than sampled.
    """

    features: Tensor
    groups: Tensor
    preview: Tensor
    info: dict[str, Any]
    path: Path | None
    cache_hit: bool


def metric_key(metric: Metric) -> str:
    """A metric's name and a hash of its description without counts (``num_*``): what identifies its value."""
    desc = {k: v for k, v in metric.describe().items() if not k.startswith("num_")}
    digest = hashlib.sha256(json.dumps(jsonable(desc), sort_keys=True).encode()).hexdigest()[:16]
    return f"{metric.name}:{digest}"


class TeacherReference:
    """A teacher's samples on the evaluation's inputs and seeds, as features in one feature space, cached on disk.

    Args:
        sampler: the teacher's harness ``Sampler`` (``fewstep.eval.samplers.teacher_sampler``; its ``network`` is
            hashed into the key).
        num_steps: the teacher's usual step count.
        inputs: the evaluation's labels / prompts (image ``i`` gets entry ``i``).
        extractor: the feature space (TF-Inception for text-to-image).
        seed: the evaluation's seed (``evaluate(seed=...)``).
        batch_size: images per sampler call.
        cache_dir: default ``$FEWSTEP_CACHE/teacher_samples``.
        use_cache: read and write the cache.
        progress: a progress bar while sampling.
    """

    def __init__(
        self,
        sampler: Sampler,
        num_steps: int,
        inputs: EvalInputs,
        extractor: FeatureExtractor,
        *,
        seed: int = 0,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"The reference teacher's steps must be >= 1; got {num_steps}.")
        self.sampler, self.num_steps, self.inputs, self.extractor = sampler, int(num_steps), inputs, extractor
        self.seed, self.batch_size, self.progress, self.use_cache = seed, batch_size, progress, use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._key: dict[str, Any] | None = None
        self.samples: ReferenceSamples | None = None

    @property
    def name(self) -> str:
        """The reference's row label: the teacher sampler's name and ``· reference``."""
        return self.sampler.name + REFERENCE_SUFFIX

    def key(self) -> dict[str, Any]:
        """Everything that identifies the samples and their features (JSON-ready)."""
        if self._key is None:
            info = self.sampler.info
            conditioning = self.inputs.prompts if self.inputs.prompts is not None else None
            if conditioning is None and self.inputs.labels is not None:
                conditioning = self.inputs.labels.tolist()
            network = self.sampler.network
            weights = module_sha256(network, without_adapters=True) if network is not None else None
            self._key = {
                "version": CACHE_VERSION,
                "teacher": {"source": info.get("source"), "denoiser_sha256": weights, "family": info.get("family")},
                "num_steps": self.num_steps,
                "guidance_scale": info.get("guidance_scale"),
                "solver": info.get("scheduler"),
                "noise_shape": list(self.sampler.noise_shape),
                "conditioning_sha256": hashlib.sha256(json.dumps(conditioning).encode()).hexdigest(),
                "num_samples": len(self.inputs),
                "seed": self.seed,
                "features": self.extractor.fingerprint(),
            }
            if info.get("first_frames_sha256"):  # an image-to-video teacher: other first frames, other samples
                self._key["first_frames_sha256"] = info["first_frames_sha256"]
        return self._key

    def path(self) -> Path | None:
        """The cache file (``None`` with ``use_cache=False``)."""
        if not self.use_cache:
            return None
        from fewstep.data.image_folder import fewstep_cache_dir

        root = self.cache_dir or fewstep_cache_dir() / "teacher_samples"
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:24]
        return root / f"{digest}.safetensors"

    def load(self, image_metrics: Sequence[Metric] = ()) -> ReferenceSamples:
        """The samples: from the cache, else sampled now (and cached). On a fresh sampling the ``image_metrics``
        (those that need the images, e.g. CLIP score) are computed on them and kept with the features; on a cache hit,
        values of metrics that are not in the file are simply not available."""
        if self.samples is not None:
            return self.samples
        path = self.path()
        samples = _read(path) if path is not None else None
        if samples is None or samples.info.get("key") != self.key():
            samples = self._sample(path, image_metrics)
        self.samples = samples
        return samples

    def _sample(self, path: Path | None, image_metrics: Sequence[Metric]) -> ReferenceSamples:
        began = time.perf_counter()
        images, nfe = sample_images(self.sampler, self.num_steps, self.inputs, seed=self.seed,
                                    batch_size=self.batch_size, progress=self.progress)  # fmt: skip
        seconds = (time.perf_counter() - began) / len(images)
        frames, inputs = frames_of(images, self.inputs)  # a video teacher's clips: measured frame by frame
        as_float = frames.float() / 255
        features = self.extractor(as_float, remember=False, desc="teacher features")
        groups = group_ids(inputs.labels, inputs.prompts, len(frames))
        values = compute_metrics(image_metrics, as_float, inputs)
        info = {
            "key": self.key(),
            "model": self.sampler.name,
            "teacher": jsonable(self.sampler.info),
            "nfe_per_image": nfe,
            "seconds_per_image": seconds,
            "metrics": {metric_key(m): values[m.name] for m in image_metrics},
            "feature_network": self.extractor.describe(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        samples = ReferenceSamples(features, groups, frames[:PREVIEW_IMAGES], info, path, cache_hit=False)
        if path is not None:
            _write(path, samples)
        return samples

    def row(self, metrics: Sequence[Metric]) -> Row:
        """The reference as a report row: metrics measured against this reference have their value by definition
        (``metric.self_value``: FID 0, precision and recall 1), metrics that take features (``compute_features``)
        are computed on the cached features, metrics of the images come from the cache (absent when it does not hold
        them)."""
        samples = self.load()
        inputs = per_frame(self.inputs, len(samples.features) // len(self.inputs))  # a video's features are per frame
        values = {}
        for metric in metrics:
            labels = inputs.labels if "labels" in metric.needs else None
            prompts = inputs.prompts if "prompts" in metric.needs else None
            if getattr(metric, "self_value", None) is not None:  # measured against this very reference
                values[metric.name] = float(metric.self_value)
            elif callable(getattr(metric, "compute_features", None)):
                values[metric.name] = float(metric.compute_features(samples.features, labels=labels, prompts=prompts))
            elif metric_key(metric) in samples.info["metrics"]:
                values[metric.name] = float(samples.info["metrics"][metric_key(metric)])
        schedule = jsonable(self.sampler.schedule(self.num_steps)) if self.sampler.schedule is not None else {}
        preview = samples.preview.float() / 255
        return Row(self.name, self.num_steps, len(self.inputs), samples.info.get("nfe_per_image"), None, None,
                   values, schedule, preview=preview)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """For the report header: the key, the cache file and whether it was a hit."""
        samples = self.samples
        return {
            "model": self.name,
            "key": self.key(),
            "cache_file": str(samples.path) if samples is not None and samples.path else None,
            "cache_hit": samples.cache_hit if samples is not None else None,
            "sampled": samples.info.get("date") if samples is not None else None,
        }


def _write(path: Path, samples: ReferenceSamples) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    tensors = {"features": samples.features.contiguous(), "groups": samples.groups.contiguous(),
               "preview": samples.preview.contiguous()}  # fmt: skip
    save_file(tensors, tmp)
    path.with_suffix(".json").write_text(json.dumps(jsonable(samples.info), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # the .safetensors appears last: its presence means the pair is complete


def _read(path: Path) -> ReferenceSamples | None:
    """The cached samples, or ``None`` when absent or unreadable (then they are sampled again)."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    from safetensors.torch import load_file

    try:
        tensors, info = load_file(path), json.loads(meta.read_text(encoding="utf-8"))
        features, groups, preview = tensors["features"], tensors["groups"], tensors["preview"]
    except (OSError, ValueError, KeyError):
        return None
    if features.ndim != 2 or groups.shape != (features.shape[0],) or not isinstance(info.get("metrics"), dict):
        return None
    return ReferenceSamples(features.double(), groups.long(), preview, info, path, cache_hit=True)


__all__ = ["CACHE_VERSION", "PREVIEW_IMAGES", "ReferenceSamples", "TeacherReference", "metric_key"]
