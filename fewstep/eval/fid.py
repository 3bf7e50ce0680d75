"""FID (Fréchet distance of feature statistics) in memory with torchmetrics, and between image folders with clean-fid.

``FID`` computes features with any feature network (``InceptionFeatures``, ``ClassifierFeatures`` or a module with
``num_features``) through a ``FeatureExtractor`` (shared with the diversity and precision / recall metrics of the
same feature space, so a row's features are computed once) and hands them to torchmetrics'
``FrechetInceptionDistance``, which keeps the sufficient statistics and computes the distance; torch-fidelity is
never needed. The reference is a set of images, a folder of image files (any sizes: each is resized by the feature
network) or precomputed features (e.g. a teacher's samples, ``fewstep.eval.teacher_reference``). The reference set's
statistics (mean ``mu`` [F] and covariance ``sigma`` [F, F], float64) are computed once and cached on disk under
``$FEWSTEP_CACHE/fid_stats/<feature fingerprint>-<reference key>.safetensors`` (+ ``.json`` with provenance), so a
report costs only the generated images' features. A different feature network (other weights or preprocessing)
has another fingerprint and therefore never reuses stale statistics. ``frechet_distance`` is the same distance
between two feature tensors.

``clean_fid_folders`` compares two folders of image files with clean-fid (an optional extra: it needs torchvision).

Numbers from different feature networks, reference sets or sample counts are not comparable (FID is biased at
small n); ``describe()`` records all of them. Cost: besides the features, every ``compute`` runs torchmetrics'
``eigvals`` of an ``F×F`` float64 matrix, about 6 s of one CPU core for Inception's F = 2048 (milliseconds for a
64-d classifier).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.eval.features import FeatureExtractor
from fewstep.eval.weights import check_clean_fid_inception, tensor_sha256

STATS_VERSION = 1  # bump when the stored statistics change meaning
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".npy")
PIL_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".npy")  # what a reference folder may hold


@dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a reference image set.

    Attributes:
        mu: mean feature ``[F]`` (float64).
        sigma: unbiased covariance ``[F, F]`` (float64).
        num_images: number of reference images.
        path: the cached ``.safetensors`` file (``None`` when caching is off).
        cache_hit: whether the statistics were read from the cache rather than computed.
    """

    mu: Tensor
    sigma: Tensor
    num_images: int
    path: Path | None
    cache_hit: bool


class FeatureInput(nn.Module):
    """The "feature network" torchmetrics is given: the identity on features ``[b, F]`` that fewstep computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def _torchmetrics_fid(num_features: int) -> Any:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise ImportError(
            "FID needs torchmetrics: `pip install 'fewstep[eval]'` (or `pip install torchmetrics`)."
        ) from err
    return FrechetInceptionDistance(feature=FeatureInput(num_features), reset_real_features=True)


def _check_set(values: Tensor, what: str, ndim: int, layout: str) -> Tensor:
    """``values`` as FID takes them: a tensor of ``ndim`` dimensions (``layout`` names them in the error) with
    ``n >= 2`` (the covariance of one sample is undefined)."""
    if not isinstance(values, Tensor) or values.ndim != ndim:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"FID takes {what} as a tensor {layout}; got {shape}.")
    if len(values) < 2:
        raise ValueError(f"FID needs at least 2 {what} (a covariance of one sample is undefined); got {len(values)}.")
    return values


def _check_feature_set(features: Tensor, what: str) -> Tensor:
    return _check_set(features, what, 2, "[n, F]")


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets ``[n, F]`` and ``[m, F]`` (torchmetrics'
    ``FrechetInceptionDistance`` on features: ``|mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^½)``)."""
    a, b = _check_feature_set(features_a, "features (first set)"), _check_feature_set(features_b, "features (second)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"The feature sets have different sizes: {a.shape[1]} and {b.shape[1]}.")
    metric = _torchmetrics_fid(a.shape[1])
    metric.update(a.double(), real=True)
    metric.update(b.double(), real=False)
    return float(metric.compute())


def _check_images(images: Tensor, what: str) -> Tensor:
    return _check_set(images, what, 4, "[n, c, h, w] in [0, 1]")


def _folder_files(directory: Path) -> list[Path]:
    """The image files of a reference folder, recursively, in sorted order."""
    if not directory.is_dir():
        raise FileNotFoundError(f"Reference image folder {str(directory)!r} does not exist.")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in PIL_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise ValueError(
            f"Reference image folder {str(directory)!r} holds {len(files)} image file(s) "
            f"({', '.join(PIL_EXTENSIONS)}); FID needs at least 2."
        )
    return files


def folder_id(directory: str | Path) -> str:
    """What identifies a folder's images in the statistics cache: its resolved path and a hash of every image file's
    relative name, size and modification time (an edited, added or removed file is another reference)."""
    root = Path(directory).expanduser().resolve()
    digest = hashlib.sha256()
    for path in _folder_files(root):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"folder:{root}:{digest.hexdigest()[:16]}"


def load_folder_image(path: Path) -> Tensor:
    """One image file as ``[3, h, w]`` RGB in ``[0, 1]`` (8-bit levels)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def folder_features(directory: str | Path, extractor: FeatureExtractor) -> Tensor:
    """Features ``[n, F]`` of every image file in ``directory`` (recursively); images of any size, batched by size."""
    from tqdm.auto import tqdm

    files, out, batch = _folder_files(Path(directory).expanduser()), [], []

    def flush() -> None:
        if batch:
            out.append(extractor(torch.stack(batch), remember=False))
            batch.clear()

    for path in tqdm(files, desc="reference folder", disable=not extractor.progress, leave=False):
        image = load_folder_image(path)
        if batch and (image.shape != batch[0].shape or len(batch) == extractor.batch_size):
            flush()
        batch.append(image)
    flush()
    return torch.cat(out)


def stats_of(features: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(mu, sigma, n)`` of features ``[n, F]``: float64 mean and unbiased covariance, as torchmetrics keeps them."""
    metric = _torchmetrics_fid(_check_feature_set(features, "reference features").shape[1])
    metric.update(features.double(), real=True)
    return _real_stats(metric)


def _set_real_stats(metric: Any, stats: ReferenceStats) -> None:
    """Load ``mu``/``sigma`` into torchmetrics' sufficient statistics (sum, sum of outer products, count)."""
    n = stats.num_images
    device = metric.real_features_sum.device
    mu, sigma = stats.mu.to(device, torch.float64), stats.sigma.to(device, torch.float64)
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)  # inverse of torchmetrics' compute
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def _real_stats(metric: Any) -> tuple[Tensor, Tensor, int]:
    """``(mu, sigma, n)`` from torchmetrics' real-feature sums (the formulas of its ``compute``)."""
    n = int(metric.real_features_num_samples)
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu(), sigma.cpu(), n


class FID:
    """FID of generated images to a fixed reference set, torchmetrics in memory, with any feature network.

    Args:
        feature_net: a module mapping images ``[b, c, h, w]`` in ``[0, 1]`` to ``[b, F]``, with ``num_features``, or
            a ``FeatureExtractor`` shared with other metrics of the same feature space (then ``batch_size``,
            ``device`` and ``progress`` are the extractor's).
        reference: the reference images ``[n, c, h, w]`` in ``[0, 1]``, a function returning them (called only
            when the statistics are not cached; then ``reference_id`` is required), or a folder of image files
            (``str`` / ``Path``; any sizes; keyed by ``folder_id``).
        reference_name: how reports name the reference set, e.g. ``"fashion-mnist test split"``.
        reference_id: what identifies the reference images in the cache key (default: a hash of the tensor, or the
            folder's ``folder_id``).
        reference_features: instead of ``reference``, a function returning the reference's features ``[n, F]`` in
            this feature space (e.g. a teacher's cached samples); their statistics are cached only with a
            ``reference_id``.
        cache_dir: where statistics are cached (default ``$FEWSTEP_CACHE/fid_stats``); ``use_cache=False`` disables.
        use_cache: read and write cached reference statistics.
        batch_size: images per feature-network call.
        device: where features are computed.
        progress: show a progress bar over batches (only when there is more than one).
        name: the report's column name.
    """

    needs: frozenset[str] = frozenset()
    higher_is_better = False
    self_value: float | None = None  # 0.0 when the reference is a teacher's samples: that teacher's own row

    def __init__(
        self,
        feature_net: nn.Module | FeatureExtractor,
        reference: Tensor | Callable[[], Tensor] | str | Path | None = None,
        reference_name: str = "reference",
        reference_id: str | None = None,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = True,
        name: str = "fid",
        reference_features: Callable[[], Tensor] | None = None,
    ) -> None:
        if isinstance(reference, str | Path):
            reference = Path(reference).expanduser()
            reference_id = reference_id or folder_id(reference)
        elif reference is not None and not isinstance(reference, Tensor) and reference_id is None:
            raise ValueError("A lazy `reference` (a function) needs `reference_id=` to key its cached statistics.")
        if reference is not None and reference_features is not None:
            raise ValueError("Give the reference as images (`reference=`) or as features (`reference_features=`).")
        if isinstance(feature_net, FeatureExtractor):
            self.extractor = feature_net
        else:
            if not hasattr(feature_net, "num_features"):
                raise TypeError(f"{type(feature_net).__name__} has no `num_features`; FID needs the feature size.")
            self.extractor = FeatureExtractor(feature_net, batch_size, device, progress)
        self.reference = reference
        self.reference_features = reference_features
        self.reference_name = reference_name
        self._reference_id = reference_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.use_cache = use_cache and (reference_features is None or reference_id is not None)
        self.name = name
        self._metric: Any = None
        self._stats: ReferenceStats | None = None
        self._stats_key: str | None = None
        self.num_generated_images: int | None = None

    @property
    def feature_net(self) -> nn.Module:
        return self.extractor.net

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    def features(self, images: Tensor) -> Tensor:
        """Features ``[n, F]`` (float64, CPU) of ``images``; computed once per image set (``FeatureExtractor``)."""
        return self.extractor(_check_images(images, "generated images"), desc="FID")

    # ------------------------------------------------------------------------------------------------- reference

    @property
    def reference_id(self) -> str | None:
        """The reference's identity in the cache key: the given id, or ``sha256:<hash of the tensor>``."""
        if self._reference_id is None and isinstance(self.reference, Tensor):
            self._reference_id = "sha256:" + tensor_sha256(self.reference)
        return self._reference_id

    def stats_path(self) -> Path | None:
        """The cache file of the reference statistics for the current feature network (``None``: no caching)."""
        if not self.use_cache or (self.reference is None and self.reference_features is None):
            return None
        from fewstep.data.image_folder import fewstep_cache_dir

        root = self.cache_dir or fewstep_cache_dir() / "fid_stats"
        ref_key = hashlib.sha256(f"v{STATS_VERSION}|{self.reference_id}".encode()).hexdigest()[:16]
        return root / f"{self.extractor.fingerprint()}-{ref_key}.safetensors"

    def reference_stats(self) -> ReferenceStats:
        """The reference statistics: in memory, else from the cache, else computed (and cached)."""
        if self.reference is None and self.reference_features is None:
            raise ValueError("This FID has no reference set: pass `reference=` (images or a function returning them).")
        path = self.stats_path()
        key = str(path) if path is not None else self.extractor.fingerprint()
        if self._stats is not None and self._stats_key == key:
            return self._stats
        stats = _load_stats(path, self.extractor.num_features) if path is not None else None
        if stats is None:
            stats = self._compute_reference_stats(path)
        self._stats, self._stats_key = stats, key
        return stats

    def _reference_feature_set(self) -> Tensor:
        if self.reference_features is not None:
            return self.reference_features()
        if isinstance(self.reference, Path):
            return folder_features(self.reference, self.extractor)
        images = self.reference if isinstance(self.reference, Tensor) else self.reference()
        return self.extractor(_check_images(images, "reference images"), remember=False, desc="FID reference")

    def _compute_reference_stats(self, path: Path | None) -> ReferenceStats:
        mu, sigma, n = stats_of(self._reference_feature_set())
        if path is not None:
            info = {
                "stats_version": STATS_VERSION,
                "reference_name": self.reference_name,
                "reference_id": self.reference_id,
                "num_images": n,
                "feature_network": self.extractor.describe(),
                "torchmetrics": _version("torchmetrics"),
            }
            _save_stats(path, mu, sigma, info)
        return ReferenceStats(mu, sigma, n, path, cache_hit=False)

    # ----------------------------------------------------------------------------------------------------- metric

    def _torchmetrics(self) -> Any:
        if self._metric is None:
            self._metric = _torchmetrics_fid(self.extractor.num_features).to(self.device)
        return self._metric

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        """FID of ``images`` (``[n, c, h, w]`` in ``[0, 1]``, n ≥ 2) to the reference set. Lower is better."""
        return self.compute_features(self.features(images))

    def compute_features(
        self, features: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> float:
        """FID of precomputed features ``[n, F]`` of this feature network to the reference set."""
        _check_feature_set(features, "generated images")
        stats = self.reference_stats()
        metric = self._torchmetrics()
        metric.reset()
        _set_real_stats(metric, stats)
        metric.update(features.to(self.device, torch.float64), real=False)
        self.num_generated_images = len(features)
        return float(metric.compute())

    def fid(self, images_a: Tensor, images_b: Tensor) -> float:
        """FID between two image sets with this feature network (no reference set, no cache)."""
        a = self.extractor(_check_images(images_a, "images (first set)"), remember=False, desc="FID a")
        b = self.extractor(_check_images(images_b, "images (second set)"), remember=False, desc="FID b")
        return frechet_distance(a, b)

    def describe(self) -> dict[str, Any]:
        """Implementation and version, feature network (with its weights hash), reference set and image counts.

        The reference's image count and cache file are known once the statistics were loaded or computed (after the
        first ``compute``); before that they are ``None``.
        """
        stats = self._stats
        return {
            "name": self.name,
            "implementation": "torchmetrics",
            "version": _version("torchmetrics"),
            "class": "FrechetInceptionDistance",
            "feature_network": self.extractor.describe(),
            "reference": {
                "name": self.reference_name,
                "id": self.reference_id,
                "stats_file": str(stats.path) if stats and stats.path else None,
                "cache_hit": stats.cache_hit if stats else None,
            },
            "num_reference_images": stats.num_images if stats else None,
            "num_generated_images": self.num_generated_images,
        }


# -------------------------------------------------------------------------------------------------------- the cache


def _save_stats(path: Path, mu: Tensor, sigma: Tensor, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, tmp)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)  # the .safetensors appears last: its presence means the pair is complete


def _load_stats(path: Path, num_features: int) -> ReferenceStats | None:
    """Cached statistics, or ``None`` when absent, unreadable or of another shape (then they are recomputed)."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    from safetensors.torch import load_file

    try:
        tensors, info = load_file(path), json.loads(meta.read_text())
        mu, sigma, n = tensors["mu"], tensors["sigma"], int(info["num_images"])
    except (OSError, ValueError, KeyError):
        return None
    f = int(num_features)
    if mu.shape != (f,) or sigma.shape != (f, f) or n < 2 or info.get("stats_version") != STATS_VERSION:
        return None
    return ReferenceStats(mu, sigma, n, path, cache_hit=True)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------------- clean-fid


def _count_images(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def clean_fid_folders(
    dir_a: str | Path,
    dir_b: str | Path,
    mode: str = "clean",
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """FID between two folders of image files with clean-fid (``pip install clean-fid``, which needs torchvision).

    clean-fid uses its own Inception file (``inception-2015-12-05.pt`` in ``/tmp``; it is checked against its pinned
    sha256 first, and downloaded and checked here when missing: ``check_clean_fid_inception``) and its own resize
    (``mode="clean"``: PIL bicubic with antialiasing), so its numbers differ slightly from
    ``FID(InceptionFeatures())`` on the same images; report which one you use.

    Args:
        dir_a, dir_b: folders of images (searched recursively).
        mode: clean-fid's mode: ``"clean"``, ``"legacy_tensorflow"`` or ``"legacy_pytorch"``.
        batch_size, num_workers, device: passed to clean-fid.
        progress: clean-fid's ``verbose``.

    Returns:
        ``{"fid", "implementation": "clean-fid", "version", "mode", "dir_a", "dir_b", "num_images_a",
        "num_images_b"}``.

    Raises:
        FileNotFoundError: a folder does not exist.
        ImportError: clean-fid is not importable (the message gives the fix and the in-memory alternative).
        WeightsMismatchError: clean-fid's Inception file is not the pinned one.
    """
    dirs = [Path(d).expanduser() for d in (dir_a, dir_b)]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"FID image folder(s) not found: {', '.join(missing)}.")
    try:
        from cleanfid import fid as cleanfid_fid
    except Exception as err:  # ImportError, or torchvision failing at import time (operator torchvision::nms)
        raise ImportError(
            f"clean-fid is not importable ({type(err).__name__}: {err}). Install it with a torchvision that matches "
            "your torch (`pip install 'fewstep[cleanfid]'`), or compute FID in memory without it: "
            "`fewstep.eval.fid.FID(InceptionFeatures(), reference=...)`."
        ) from err
    if mode in ("clean", "legacy_tensorflow"):  # clean-fid loads its TorchScript Inception from /tmp: check it first
        check_clean_fid_inception()
    kwargs: dict[str, Any] = {"mode": mode, "batch_size": batch_size, "num_workers": num_workers, "verbose": progress}
    if "use_dataparallel" in inspect.signature(cleanfid_fid.compute_fid).parameters:
        kwargs["use_dataparallel"] = False
    value = cleanfid_fid.compute_fid(str(dirs[0]), str(dirs[1]), device=torch.device(device), **kwargs)
    return {
        "fid": float(value),
        "implementation": "clean-fid",
        "version": _version("clean-fid"),
        "mode": mode,
        "dir_a": str(dirs[0]),
        "dir_b": str(dirs[1]),
        "num_images_a": _count_images(dirs[0]),
        "num_images_b": _count_images(dirs[1]),
    }


__all__ = [
    "FID",
    "FeatureInput",
    "ReferenceStats",
    "clean_fid_folders",
    "folder_features",
    "folder_id",
    "frechet_distance",
    "load_folder_image",
    "stats_of",
]
