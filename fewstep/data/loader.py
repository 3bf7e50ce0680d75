"""Resumable, sharded batch streams for the trainer.

The stream is one endless sequence of dataset indices: epoch ``e`` is a permutation drawn from ``(seed, e)`` (or the
identity when ``shuffle`` is off), epochs follow each other. ``position`` is the number of samples consumed by all
ranks together, so a run resumed at ``position = k`` sees exactly the samples an uninterrupted run saw after ``k``.
Each optimizer micro-step consumes ``batch_size × world_size`` samples; rank ``r`` takes the ``r``-th contiguous
chunk of ``batch_size``, so ranks never share a sample within a global batch. With ``data.buckets`` (image folders) a
``BucketSampler`` takes the permutation's place, so each global batch holds one bucket's images. An image folder with
``data.num_frames`` is a video folder (``fewstep.data.video_folder``): clips in place of images.
``data.source: webdataset`` streams tar shards instead (``fewstep.data.webdataset.ShardStream``, same interface).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.data.buckets import (
    BucketSampler,
    check_teacher_buckets,
    image_sizes,
    nearest_bucket,
    resolve_buckets,
    sized_conditioning,
)
from fewstep.data.digits import DigitsDataset
from fewstep.data.fashion import CLASS_NAMES, FashionMNISTDataset
from fewstep.data.first_frames import (
    check_first_frame_source,
    clip_size,
    needs_first_frames,
    takes_first_frames,
    with_first_frames,
)
from fewstep.data.image_folder import ImageFolderDataset, LatentCache, encode_items
from fewstep.data.order import epoch_order
from fewstep.data.prompts import PromptDataset
from fewstep.data.tensors import TensorFileDataset
from fewstep.data.video_folder import (
    UNREADABLE,
    VideoFolderDataset,
    clip_first_frames,
    encode_clips,
    prepare_video_data,
)
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher

if TYPE_CHECKING:
    from fewstep.data.webdataset import ShardStream

logger = logging.getLogger(__name__)

SOURCES = (
    "cache", "digits", "fashion_mnist", "image_folder", "moving_digits", "pairs", "prompts", "tensors", "webdataset"
)  # fmt: skip
CLASS_SOURCES = ("digits", "fashion_mnist", "moving_digits")  # labelled data sets: grids cycle through the classes
STREAM_PROMPTS = 4096  # captions a streaming source keeps encoded (its captions rarely repeat)


class IndexStream:
    """Global stream positions → dataset indices (one cached epoch permutation at a time)."""

    def __init__(self, num_items: int, seed: int, shuffle: bool) -> None:
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch_samples = num_items
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.num_items)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.num_items, epoch, self.seed, self.shuffle)
            out.append(int(self._order[offset]))
        return out


class PromptCache:
    """Encodes each distinct prompt once with the teacher's own encoders and keeps its ``(cond, uncond)`` rows
    (the ``max_prompts`` most recently added ones, when given). For an image-to-video teacher a prompt may come with
    its first frame (an image file): such rows are keyed on ``(prompt, image)`` and the image is prepared for the clip
    the objective samples (``fewstep.data.first_frames.clip_size``); rows without one are keyed on the prompt."""

    def __init__(self, teacher: Teacher, resolution: int | None = None, max_prompts: int | None = None) -> None:
        self.teacher, self.resolution, self.max_prompts = teacher, resolution, max_prompts
        self._rows: dict[str | tuple[str, str], tuple[Conditioning, Conditioning | None]] = {}

    def __call__(
        self, prompts: list[str], device: Any = None, images: list[Path] | None = None
    ) -> tuple[Conditioning, Conditioning | None]:
        """``(cond, uncond)`` of ``prompts`` (``[b, ...]`` on ``device``), each with its first frame ``images[i]``
        when given."""
        items = [(p, str(images[i]) if images is not None else None) for i, p in enumerate(prompts)]
        keys = [p if image is None else (p, image) for p, image in items]
        missing = list(dict.fromkeys(item for item, key in zip(items, keys) if key not in self._rows))
        if missing:
            cond, uncond = self._encode(missing)
            for i, (p, image) in enumerate(missing):
                row = slice(i, i + 1)
                null = uncond.index(row).to("cpu") if uncond is not None else None
                self._rows[p if image is None else (p, image)] = (cond.index(row).to("cpu"), null)
        cond = Conditioning.cat([self._rows[k][0] for k in keys]).to(device)
        unconds = [self._rows[k][1] for k in keys]
        uncond = Conditioning.cat(unconds).to(device) if all(u is not None for u in unconds) else None
        while self.max_prompts is not None and len(self._rows) > self.max_prompts:
            del self._rows[next(iter(self._rows))]  # the oldest
        return cond, uncond

    def _encode(self, keys: list[tuple[str, str | None]]) -> tuple[Conditioning, Conditioning | None]:
        from fewstep.models.prompts import encode_prompts, encode_with_pipeline

        prompts = [prompt for prompt, _ in keys]
        with torch.no_grad():
            if keys[0][1] is None and needs_first_frames(self.teacher):  # the text of clips: their frames come after
                return encode_with_pipeline(self.teacher.pipeline, self.teacher.family, prompts)
            if keys[0][1] is None:
                return encode_prompts(self.teacher, prompts, resolution=self.resolution)
            from PIL import Image

            frames, height, width = clip_size(self.teacher)
            pil = []
            for _, file in keys:
                with Image.open(file) as image:
                    pil.append(image.convert("RGB"))
            return encode_prompts(self.teacher, prompts, images=pil, resolution=(height, width), num_frames=frames)


def is_class_conditional(teacher: Teacher) -> bool:
    """Whether the teacher takes class labels (its null conditioning has a class, or its backbone embeds classes)."""
    if teacher.null_cond is not None and teacher.null_cond.class_labels is not None:
        return True
    config = getattr(teacher.denoiser.backbone, "config", None) or {}
    return config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None


class BatchStream:
    """An endless, resumable iterator of ``Batch`` for one rank. ``position`` counts samples of all ranks.

    Build it with ``build_batches``. ``preview(n)`` gives a fixed batch (for sample grids) without moving.
    ``skipped`` counts unusable samples: the files of a video folder left out or failing mid-run (the other sources
    refuse bad data up front).
    """

    def __init__(
        self,
        data_cfg: Any,
        teacher: Teacher,
        device: Any = "cpu",
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        seed: int = 0,
    ) -> None:
        if data_cfg.source not in SOURCES:
            raise ValueError(f"data.source {data_cfg.source!r} is not one of {', '.join(SOURCES)}.")
        self.cfg, self.teacher, self.device = data_cfg, teacher, device
        self.rank, self.world_size, self.position = rank, world_size, start_position
        self.batch_size = int(data_cfg.batch_size)
        prepare_video_data(data_cfg, teacher)  # the clip shape fits the teacher (train checks it before the student)
        self.dataset = _build_dataset(data_cfg)
        self.video = isinstance(self.dataset, VideoFolderDataset)
        check_first_frame_source(data_cfg, teacher, self._has_first_frames())
        # image-to-video: the first frame of each clip, or the image each prompt names (other teachers ignore them)
        self.first_frames = takes_first_frames(teacher) and self._has_first_frames()
        self.skipped = self.dataset.left_out if self.video else 0
        self.index_stream: IndexStream | BucketSampler = IndexStream(len(self.dataset), seed, bool(data_cfg.shuffle))
        with_prompts = data_cfg.source in ("image_folder", "prompts")
        self._prompts = PromptCache(teacher, data_cfg.resolution) if with_prompts else None
        self._cache: LatentCache | None = None
        self.buckets, self.item_buckets = None, None  # data.buckets: each image's bucket (its batch's shape)
        if data_cfg.source == "image_folder":
            if data_cfg.buckets:
                self._use_buckets(seed)
            elif not data_cfg.resolution:
                raise ValueError("data.source=image_folder needs data.resolution (the image size fed to the VAE).")
            self._cache = LatentCache(_vae_key(teacher))

    def _has_first_frames(self) -> bool:
        """Whether the data names first frames: clips, a prompt set with images, or a cache made of either."""
        if self.cfg.source == "prompts":
            return self.dataset.images is not None
        if self.cfg.source == "cache":
            return bool(self.dataset.manifest["source"].get("video"))
        return self.video

    def _use_buckets(self, seed: int) -> None:
        self.buckets = resolve_buckets(self.cfg.buckets)
        check_teacher_buckets(self.buckets, self.teacher)
        sizes = image_sizes([file for file, _ in self.dataset.items])
        self.item_buckets = [nearest_bucket(h, w, self.buckets) for h, w in sizes]
        global_batch = self.batch_size * self.world_size
        self.index_stream = BucketSampler(self.item_buckets, global_batch, seed, bool(self.cfg.shuffle))

    def stream_state(self) -> dict[str, int | None]:
        """Where the next global batch starts: ``{"epoch", "shard": None, "offset"}`` (samples into the epoch)."""
        epoch, offset = divmod(self.position, self.index_stream.epoch_samples)
        return {"epoch": epoch, "shard": None, "offset": offset}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        start = self.position + self.rank * self.batch_size
        idx = self.index_stream.indices(start, self.batch_size)
        epoch = self.position // self.index_stream.epoch_samples
        self.position += self.batch_size * self.world_size
        batch = self.make_batch(idx)
        if self.video and self.dataset.skipped_files and self.position // self.index_stream.epoch_samples > epoch:
            logger.warning("end of epoch %d: %s", epoch, self.dataset.summary())
        return batch

    def preview(self, n: int) -> Batch:
        """A fixed batch of ``n`` for sample grids: digits and Fashion-MNIST cycle through the classes, other sources
        take the first ``n`` items (cycled). ``extra["labels"]`` names each item for the grid (its class or its
        prompt) when the source knows it. Does not move ``position``."""
        if self.cfg.source in CLASS_SOURCES:
            labels = self.dataset.labels
            classes = labels.unique().tolist()  # 0..9 (a small idx directory may lack some)
            idx = [int((labels == classes[k % len(classes)]).nonzero()[0]) for k in range(n)]
        else:
            idx = [i % len(self.dataset) for i in range(n)]
        batch = self.make_batch(idx)
        names = self.item_labels(idx)
        if names is not None:
            batch.extra["labels"] = names
        return batch

    def item_labels(self, idx: list[int]) -> list[str] | None:
        """What each item is conditioned on, as text: the prompt or caption, or the class (Fashion-MNIST's by name);
        ``None`` for sources that keep no such text (pairs, tensors)."""
        source = self.cfg.source
        if source == "prompts":
            return [self.dataset[i] for i in idx]
        if source == "image_folder":
            return [self.dataset[i][1] for i in idx]
        if source == "cache":
            return self.dataset.captions(idx)
        if source in ("digits", "moving_digits"):
            return [str(int(self.dataset.labels[i])) for i in idx]
        if source == "fashion_mnist":
            return [CLASS_NAMES[int(self.dataset.labels[i])] for i in idx]
        return None

    def make_batch(self, idx: list[int]) -> Batch:
        if self.cfg.source == "digits":
            ds: DigitsDataset = self.dataset
            x0 = ds.images[idx].to(self.device)  # [b, 1, 8, 8]
            if not is_class_conditional(self.teacher):
                return Batch(cond=Conditioning(), uncond=None, x0=x0)
            cond = Conditioning(class_labels=ds.labels[idx].to(self.device))
            return Batch(cond=cond, uncond=self.teacher.uncond_like(cond), x0=x0)
        if self.cfg.source in ("tensors", "fashion_mnist", "moving_digits"):
            x0, labels = self.dataset.batch(idx)
            if labels is None:
                return Batch(cond=Conditioning(), uncond=None, x0=x0.to(self.device))
            cond = Conditioning(class_labels=labels.to(self.device))
            return Batch(cond=cond, uncond=self.teacher.uncond_like(cond), x0=x0.to(self.device))
        if self.cfg.source == "pairs":  # reflow couplings: x0 = the teacher's sample, extra["noise"] = its noise
            noise, x0, cond = self.dataset.batch(idx)
            cond = cond.to(self.device)
            uncond = self.teacher.uncond_like(cond) if cond.batch_size is not None else None
            return Batch(cond=cond, uncond=uncond, x0=x0.to(self.device), extra={"noise": noise.to(self.device)})
        if self.cfg.source == "prompts":
            images = [self.dataset.images[i] for i in idx] if self.first_frames else None
            cond, uncond = self._prompts([self.dataset[i] for i in idx], self.device, images)
            return Batch(cond=cond, uncond=uncond, x0=None)
        if self.cfg.source == "cache":  # what image_folder / prompts give, read from fewstep.data.cache
            return self._cached_batch(idx)
        files, captions = zip(*(self.dataset[i] for i in idx))
        if self.video:
            cond, uncond = self._prompts(list(captions), self.device)
            x0, used = self._clips(list(idx))
            if self.first_frames:  # the first frame of each clip, as pixels (not decoded back from its latents)
                size, frames = int(self.cfg.resolution), self.dataset.num_frames
                pixels = clip_first_frames(used, size, self._cache)  # [b, 3, h, w]
                cond, uncond = with_first_frames(self.teacher, cond, uncond, pixels, frames, (size, size))
            return Batch(cond=cond, uncond=uncond, x0=x0)
        # with buckets the batch takes its first image's bucket (a training batch is one bucket; a preview may mix)
        size = self.buckets[self.item_buckets[idx[0]]] if self.buckets else int(self.cfg.resolution)
        x0 = encode_items(list(files), size, self._encode, self._cache, self.device, self.cfg.num_workers)
        cond, uncond = self._prompts(list(captions), self.device)
        if self.buckets:
            cond, uncond = sized_conditioning(self.teacher, size, cond, uncond)
        return Batch(cond=cond, uncond=uncond, x0=x0)

    def _clips(self, idx: list[int]) -> tuple[Tensor, list[Path]]:
        """Video latents ``[b, c, f, h, w]`` of items ``idx`` and the file each came from; a clip that fails to decode
        is skipped and counted, and its place taken by the batch's first good clip (the folder's next good one when the
        whole batch fails)."""
        files = [self.dataset[i][0] for i in idx]
        shape = (int(self.cfg.resolution), self.dataset.num_frames, self.dataset.frame_stride)
        latents, failed = encode_clips(files, *shape, self._encode, self._cache, self.device, self.cfg.num_workers)
        for i, why in failed.items():
            self.dataset.skip(files[i], UNREADABLE, why)
        self.skipped += len(failed)
        good = next(((lat, file) for lat, file in zip(latents, files) if lat is not None), None)
        if good is None:  # the whole batch failed: the folder's next clip that decodes fills it
            good = self._next_good_clip(idx[-1], shape)
        used = [(lat, file) if lat is not None else good for lat, file in zip(latents, files)]
        return torch.stack([lat for lat, _ in used]).to(self.device), [file for _, file in used]

    def _next_good_clip(self, after: int, shape: tuple[int, int, int]) -> tuple[Tensor, Path]:
        for j in range(1, len(self.dataset)):
            file = self.dataset[(after + j) % len(self.dataset)][0]
            (latent,), _ = encode_clips([file], *shape, self._encode, self._cache, self.device)
            if latent is not None:
                return latent, file
        raise ValueError(f"No video of {self.dataset.root} decodes any more: {self.dataset.summary()}.")

    def _cached_batch(self, idx: list[int]) -> Batch:
        x0, cond, uncond = self.dataset.batch(idx)
        null = self.teacher.null_cond
        if null is not None and null.guidance is not None:  # Flux's embedded guidance: the teacher's, never cached
            guidance = null.guidance.repeat(len(idx))
            cond = cond.replace(guidance=guidance)
            uncond = uncond.replace(guidance=guidance) if uncond is not None else None
        return Batch(
            cond=cond.to(self.device),
            uncond=uncond.to(self.device) if uncond is not None else None,
            x0=x0.to(self.device) if x0 is not None else None,
        )

    def _encode(self, images: Tensor) -> Tensor:
        from fewstep.models.vae import encode_images

        return encode_images(self.teacher, images)


def build_batches(
    data_cfg: Any, teacher: Teacher, accelerator: Any = None, start_position: int = 0, seed: int = 0
) -> BatchStream | ShardStream:
    """The batch stream of this rank.

    Args:
        data_cfg: the recipe's ``data`` block (``source``, ``path``, ``prompts``, ``resolution``, ``batch_size`` per
            rank, ``shuffle``, ``caption_column``).
        teacher: encodes prompts and images (its own text encoders and VAE) and supplies the null conditioning
            (for ``data.source: cache`` it encodes nothing: ``fewstep.data.cache.load_cached_teacher``).
        accelerator: gives the device, rank and world size (``None``: CPU, one process).
        start_position: samples already consumed by all ranks (from a checkpoint).
        seed: seeds the epoch permutations (the same on every rank).
    """
    device = accelerator.device if accelerator is not None else "cpu"
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if data_cfg.source == "webdataset":
        from fewstep.data.webdataset import ShardStream

        check_first_frame_source(data_cfg, teacher, has_frames=True)  # clips (image shards are refused)

        prompts = PromptCache(teacher, data_cfg.resolution, max_prompts=STREAM_PROMPTS)
        return ShardStream(data_cfg, teacher, prompts, device, rank, world, start_position, seed)
    return BatchStream(data_cfg, teacher, device, rank, world, start_position, seed)


def _build_dataset(data_cfg: Any) -> Any:
    if data_cfg.source == "digits":
        return DigitsDataset("train")  # the test split stays held out for evaluation
    if data_cfg.source == "fashion_mnist":
        return FashionMNISTDataset("train", data_cfg.path)  # the t10k split stays held out for evaluation
    if data_cfg.source == "moving_digits":  # the test split stays held out for evaluation
        from fewstep.data.moving_digits import FRAME_SIZE, NUM_FRAMES, MovingDigitsDataset

        return MovingDigitsDataset("train", data_cfg.num_frames or NUM_FRAMES, data_cfg.resolution or FRAME_SIZE)
    if data_cfg.source == "tensors":
        return TensorFileDataset(data_cfg.path)
    if data_cfg.source == "pairs":
        from fewstep.data.reflow.pairs import PairDataset

        return PairDataset(data_cfg.path)
    if data_cfg.source == "prompts":
        return PromptDataset(data_cfg.prompts, data_cfg.path)
    if data_cfg.source == "cache":
        from fewstep.data.cache import CachedDataset

        return CachedDataset(data_cfg.path)
    if not data_cfg.path:
        raise ValueError("data.source=image_folder needs data.path (a folder with images and metadata.jsonl).")
    if data_cfg.num_frames is not None:
        return VideoFolderDataset(data_cfg.path, data_cfg.caption_column, data_cfg.num_frames, data_cfg.frame_stride)
    return ImageFolderDataset(data_cfg.path, data_cfg.caption_column)


def _vae_key(teacher: Teacher) -> str:
    pipe = teacher.pipeline
    vae = getattr(pipe, "vae", None)
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", "")
    dtype = getattr(vae, "dtype", None)
    return f"{teacher.family}|{name}|{type(vae).__name__}|{dtype}"
