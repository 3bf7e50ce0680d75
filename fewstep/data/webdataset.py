"""``data.source: webdataset``: training batches streamed from WebDataset tar shards, resumable exactly.

A sample is an image (``jpg``/``jpeg``/``png``/``webp``) or, with ``data.num_frames``, a video
(``mp4``/``webm``/``mkv``, decoded with PyAV: ``num_frames`` frames, every ``data.frame_stride``-th from the first)
plus a caption: a member named after ``data.caption_column``, else that key of the ``json`` member, else the ``txt``
member. Images and frames are
resized and center-cropped as an image folder's are (``fewstep.data.image_folder.crop_to``) and encoded through the
teacher's VAE; captions through its text encoders.

Order. Shard ``i`` belongs to rank ``i % world_size``. In epoch ``e`` a rank visits its shards in a permutation seeded
by ``(seed, e)``; a shard's samples come in the order of a shuffle buffer of ``data.shuffle_buffer`` samples seeded by
``(seed, e, shard)``. With buckets (``data.buckets``) the samples of a shard, in that order, are grouped per bucket
into batches (the last batch of a bucket in a shard is filled up with the bucket's own samples), so every batch has
one shape.

Resume. ``position`` counts samples of all ranks; a rank has consumed ``position // world_size`` samples of its own
sequence. From the per-shard sample counts (``fewstep.data.shards.index_shards``) that is an ``(epoch, shard,
offset)`` (``stream_state()``); a rebuilt stream opens that shard and passes over ``offset`` samples without decoding
them, so it yields exactly what the uninterrupted stream would have. Resume with the same ``data.batch_size``, number
of processes and shards.

Damaged samples (undecodable image or video, missing caption, too few frames, a sample its shard lost) are skipped and
counted in ``skipped``: its place in the batch takes a copy of the batch's first good sample (when none is good, the
stream's next good sample), so batches keep their size and ``position`` its meaning.

Image-to-video teachers (``fewstep.data.first_frames``) are conditioned on the first frame of each clip, its pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.data.buckets import Bucket, check_teacher_buckets, nearest_bucket, resolve_buckets, sized_conditioning
from fewstep.data.clips import SampleError, decode_clip
from fewstep.data.first_frames import takes_first_frames, with_clip_first_frames
from fewstep.data.image_folder import load_image
from fewstep.data.order import epoch_order, keyed_random
from fewstep.data.shards import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    buffer_order,
    index_shards,
    iter_samples,
    list_shards,
    media_size,
    read_plan,
    require_webdataset,
)

logger = logging.getLogger(__name__)

WARN_SKIPS = 10  # the first skipped samples are named in the log; all are counted (``skipped``, ``data/skipped``)
Slot = tuple[dict[str, Any] | None, int | None, Path]  # (raw sample, bucket index, shard)
Item = tuple[Tensor, str, str]  # (pixels, caption, "<shard file>/<key>")


def sample_caption(sample: dict[str, Any], column: str) -> str:
    """The caption: the member with extension ``column``, else ``column`` of the ``json`` member, else ``txt``.

    Raises:
        SampleError: none of them is there (or the ``json`` member is not JSON).
    """
    if column in sample and not column.startswith("__"):
        return sample[column].decode("utf-8").strip()
    if "json" in sample:
        try:
            row = json.loads(sample["json"])
        except ValueError as err:
            raise SampleError(f"its json member is not JSON ({err})") from err
        if isinstance(row, dict) and column in row:
            return str(row[column]).strip()
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    raise SampleError(f"has no caption (a .txt member, {column!r} in its .json, or a .{column} member)")


def decode_sample(
    sample: dict[str, Any],
    size: int | tuple[int, int],
    caption_column: str = "text",
    num_frames: int | None = None,
    frame_stride: int = 1,
) -> tuple[Tensor, str]:
    """A raw sample → ``(pixels, caption)``: ``[3, h, w]`` (an image) or ``[3, f, h, w]`` (with ``num_frames``).

    Raises:
        SampleError: no usable image / video or caption.
    """
    caption = sample_caption(sample, caption_column)
    kinds = VIDEO_EXTENSIONS if num_frames else IMAGE_EXTENSIONS
    ext = next((e for e in kinds if e in sample), None)
    if ext is None:
        raise SampleError(f"has no {'video' if num_frames else 'image'} ({', '.join(kinds)})")
    if num_frames:
        return decode_clip(sample[ext], size, num_frames, frame_stride), caption
    try:
        return load_image(sample[ext], size), caption
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:  # PIL's decoders
        raise SampleError(f"its {ext} could not be decoded ({err})") from err


def takes_video(teacher: Any) -> bool:
    """Whether the teacher's VAE (its backbone for pixel teachers) is a video model (has 3-D convolutions)."""
    vae = getattr(teacher.pipeline, "vae", None) if teacher.pipeline is not None else None
    module = vae if vae is not None else teacher.denoiser.backbone
    return any(isinstance(m, torch.nn.Conv3d) for m in module.modules())


class ShardStream:
    """The batch stream of one rank over WebDataset shards; the same interface as ``fewstep.data.loader.BatchStream``
    (``position``, ``next``, ``preview``) plus ``skipped`` and ``stream_state()``. Build it with ``build_batches``.

    Args:
        data_cfg: the recipe's ``data`` block (``source: webdataset``).
        teacher: encodes images (VAE) and supplies the pixel multiple the buckets must respect.
        prompts: captions → ``(cond, uncond)`` (``fewstep.data.loader.PromptCache``).
        device, rank, world_size: where this rank runs.
        start_position: samples already consumed by all ranks (from a checkpoint).
        seed: the run's seed.
    """

    def __init__(
        self,
        data_cfg: Any,
        teacher: Any,
        prompts: Any,
        device: Any = "cpu",
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        seed: int = 0,
    ) -> None:
        require_webdataset()
        self.cfg, self.teacher, self.prompts, self.device = data_cfg, teacher, prompts, device
        self.rank, self.world_size, self.position, self.seed = rank, world_size, start_position, seed
        self.batch_size, self.skipped = int(data_cfg.batch_size), 0
        self.buckets = resolve_buckets(data_cfg.buckets) if data_cfg.buckets else None
        if (data_cfg.num_frames or (self.buckets and len(self.buckets[0]) == 3)) and not takes_video(teacher):
            raise ValueError(
                f"data asks for video clips (data.num_frames or [frames, height, width] buckets), but the teacher "
                f"({teacher.family}) is an image model; video shards need a video teacher."
            )
        if self.buckets:
            check_teacher_buckets(self.buckets, teacher)
        shards = list_shards(data_cfg.path)
        self.shard_ids = list(range(rank, len(shards), world_size))  # shard i → rank i % world_size
        if not self.shard_ids:
            raise ValueError(
                f"data.path names {len(shards)} shard(s) for {world_size} processes; each process reads shards of "
                f"its own, so write at least {world_size} (e.g. fewstep data RECIPE --to-shards DIR --shard-size N)."
            )
        self.shards = [shards[i] for i in self.shard_ids]
        index = index_shards(self.shards, sizes=self.buckets is not None)
        self.counts = index.counts
        self.sample_buckets: list[list[int | None]] | None = None
        if self.buckets is not None and index.sizes is not None:
            self.sample_buckets = [
                [nearest_bucket(*s, self.buckets) if s is not None else None for s in sizes] for sizes in index.sizes
            ]
        self.slots = [self._slot_count(k) for k in range(len(self.shards))]  # places per shard and epoch
        self.epoch_samples = sum(self.slots)
        if self.epoch_samples == 0:
            raise ValueError(f"The shards of process {rank} ({self.shards[0]}, ...) hold no usable sample.")
        local = start_position // world_size
        if self.buckets and local % self.batch_size:
            raise ValueError(
                f"Cannot resume bucketed shards at position {start_position}: it is not a whole number of batches of "
                f"{self.batch_size} × {world_size} processes. Resume with the batch size and processes of the run."
            )
        self._ahead: deque[Slot] = deque()  # places drawn ahead (the fill-in of a batch with no good sample)
        workers = int(data_cfg.num_workers)
        self._map = ThreadPoolExecutor(workers, thread_name_prefix="decode").map if workers else map
        self._slots = self._slot_stream(local)

    # --- where the stream is ------------------------------------------------------------------------------------

    def _slot_count(self, k: int) -> int:
        if self.sample_buckets is None:
            return self.counts[k]
        per_bucket = Counter(b for b in self.sample_buckets[k] if b is not None)
        return sum(math.ceil(n / self.batch_size) * self.batch_size for n in per_bucket.values())

    def _shard_order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.shards), epoch, self.seed, bool(self.cfg.shuffle)).tolist()

    def _locate(self, local: int) -> tuple[int, int, int]:
        """``(epoch, k, offset)``: this rank's ``local``-th place is place ``offset`` of its ``k``-th shard."""
        epoch, rest = divmod(local, self.epoch_samples)
        for k in self._shard_order(epoch):
            if rest < self.slots[k]:
                return epoch, k, rest
            rest -= self.slots[k]
        raise AssertionError("unreachable: rest < epoch_samples")

    def stream_state(self) -> dict[str, int]:
        """Where this rank's next sample comes from: ``{"epoch", "shard" (index in data.path's list), "offset"}``."""
        epoch, k, offset = self._locate(self.position // self.world_size)
        return {"epoch": epoch, "shard": self.shard_ids[k], "offset": offset}

    def shard_plan(self, epoch: int, k: int) -> list[tuple[int, int | None]]:
        """``(sample index in file order, bucket)`` for each place of shard ``k`` in ``epoch``."""
        n = self.counts[k]
        if self.cfg.shuffle:
            order = buffer_order(n, int(self.cfg.shuffle_buffer), keyed_random(self.seed, epoch, self.shard_ids[k]))
        else:
            order = list(range(n))
        if self.sample_buckets is None:
            return [(i, None) for i in order]
        plan, pending = [], {}
        for i in order:
            bucket = self.sample_buckets[k][i]
            if bucket is None:
                continue
            pending.setdefault(bucket, []).append(i)
            if len(pending[bucket]) == self.batch_size:
                plan += [(j, bucket) for j in pending.pop(bucket)]
        for bucket, items in sorted(pending.items()):  # a bucket's last batch, filled up with its own samples
            plan += [(items[j % len(items)], bucket) for j in range(self.batch_size)]
        return plan

    def _slot_stream(self, local: int) -> Iterator[Slot]:
        epoch, k, offset = self._locate(local)
        order = self._shard_order(epoch)
        order = order[order.index(k) :]
        while True:
            for k in order:
                if self.sample_buckets is not None and offset == 0:  # no readable header: no bucket
                    unsized = self.sample_buckets[k].count(None)
                    self._skip(self.shards[k], "no readable image or video header", None, unsized)
                plan = self.shard_plan(epoch, k)
                raws = read_plan(self.shards[k], [i for i, _ in plan], offset)
                for (_, bucket), raw in zip(plan[offset:], raws):
                    yield raw, bucket, self.shards[k]
                offset = 0
            epoch += 1
            order = self._shard_order(epoch)

    # --- batches ------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        slots = [self._ahead.popleft() if self._ahead else next(self._slots) for _ in range(self.batch_size)]
        size, frames = self._shape(slots[0][1])
        results = list(self._map(lambda slot: self._decode(slot, size, frames), slots))
        for (raw, _, shard), result in zip(slots, results):
            if isinstance(result, str):
                self._skip(shard, result, raw)
        items = [r if not isinstance(r, str) else None for r in results]
        good = next((item for item in items if item is not None), None) or self._look_ahead(size, frames)
        self.position += self.batch_size * self.world_size
        return self._batch([item if item is not None else good for item in items], size)

    def preview(self, n: int) -> Batch:
        """A fixed batch of ``n`` for sample grids: the first good samples of this rank's shards in file order
        (cycled), at the bucket of the first one. ``extra["labels"]`` holds the captions. Moves nothing."""
        items, size, frames = [], None, None
        for shard in self.shards:
            with contextlib.closing(iter_samples(shard)) as samples:
                for raw in samples:
                    if size is None:
                        size, frames = self._shape(self._bucket_of(raw))
                    item = self._decode((raw, None, shard), size, frames)
                    if not isinstance(item, str):
                        items.append(item)
                    if len(items) == n:
                        break
            if len(items) == n:
                break
        if not items:
            raise ValueError(f"No sample of {self.shards[0]}, ... could be decoded for the sample grid.")
        items = [items[i % len(items)] for i in range(n)]
        batch = self._batch(items, size)
        batch.extra["labels"] = [caption for _, caption, _ in items]
        return batch

    def _shape(self, bucket: int | None) -> tuple[int | tuple[int, int], int | None]:
        """The crop size and frame count of a batch of ``bucket`` (None: ``data.resolution``, ``data.num_frames``)."""
        if bucket is None or self.buckets is None:
            return int(self.cfg.resolution), self.cfg.num_frames
        shape: Bucket = self.buckets[bucket]
        return (shape[-2], shape[-1]), (shape[0] if len(shape) == 3 else None)

    def _bucket_of(self, raw: dict[str, Any]) -> int | None:
        if self.buckets is None:
            return None
        ext = next((e for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS if e in raw), None)
        size = media_size(ext, io.BytesIO(raw[ext])) if ext is not None else None
        return nearest_bucket(*size, self.buckets) if size is not None else 0

    def _decode(self, slot: Slot, size: Any, frames: int | None) -> Item | str:
        """``(pixels, caption, "<shard file>/<key>")``, or why the place has no usable sample."""
        raw, _, shard = slot
        if raw is None:
            return "the sample is missing from its shard"
        try:
            pixels, caption = decode_sample(raw, size, self.cfg.caption_column, frames, int(self.cfg.frame_stride))
        except SampleError as err:
            return str(err)
        return pixels, caption, f"{shard.name}/{raw['__key__']}"

    def _skip(self, shard: Path, why: str, raw: dict[str, Any] | None = None, number: int = 1) -> None:
        """Count ``number`` skipped samples; the first ``WARN_SKIPS`` are named in the log."""
        if number and self.skipped < WARN_SKIPS:
            what = f"sample {raw['__key__']!r} of {shard}" if raw is not None else f"{number} sample(s) of {shard}"
            logger.warning("skipped %s: %s (data/skipped counts every skip)", what, why)
        self.skipped += number

    def _look_ahead(self, size: Any, frames: int | None) -> Item:
        """The stream's next good sample, without consuming it: the places drawn for it stay queued for the next
        batches (where a bad one is counted)."""
        for slot in list(self._ahead):
            item = self._decode(slot, size, frames)
            if not isinstance(item, str):
                return item
        for _ in range(self.epoch_samples):
            slot = next(self._slots)
            self._ahead.append(slot)
            item = self._decode(slot, size, frames)
            if not isinstance(item, str):
                return item
        raise ValueError(f"No sample in a whole epoch of {len(self.shards)} shard(s) ({self.shards[0]}, ...) decodes.")

    def _batch(self, items: list[Item], size: Any) -> Batch:
        """Encode ``items``; ``extra["keys"]`` names each sample (``<shard file>/<key>``)."""
        from fewstep.models.vae import encode_images

        pixels = torch.stack([pixels for pixels, _, _ in items]).to(self.device)  # [b, 3, h, w] or [b, 3, f, h, w]
        with torch.no_grad():
            x0 = encode_images(self.teacher, pixels).float().to(self.device)
        cond, uncond = self.prompts([caption for _, caption, _ in items], self.device)
        if self.buckets is not None:  # size is the bucket's (height, width)
            cond, uncond = sized_conditioning(self.teacher, size, cond, uncond)
        if pixels.ndim == 5 and takes_first_frames(self.teacher):  # image-to-video: each clip's own first frame
            cond, uncond = with_clip_first_frames(self.teacher, cond, uncond, pixels)
        return Batch(cond=cond, uncond=uncond, x0=x0, extra={"keys": [key for _, _, key in items]})
