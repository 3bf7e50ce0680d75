"""Aspect-ratio / resolution buckets (``data.buckets``): every image trains at the bucket whose aspect ratio is
nearest its own, and every batch holds one bucket's samples, so the whole batch has one shape.

A bucket is ``[height, width]`` (images) or ``[frames, height, width]`` (video clips). Presets: ``sdxl`` (the 41
shapes SDXL was trained on, 90-100% of 1024² pixels, sides multiples of 64) and ``sd15`` (the same aspect ratios at
half the side, for 512-px models). Each image is resized to cover its bucket and center-cropped to it
(``fewstep.data.image_folder.crop_to``, the rule of every image source).

Sides must be multiples of the teacher's pixel multiple (``fewstep.models.backbones.pixel_multiple``: the VAE's
downsampling × the backbone's patch size), or the latents could not be patchified.

``BucketSampler`` draws an image folder's batches as a pure function of ``(seed, position)``: per epoch, each bucket's
items in a seeded order, cut into global batches (``batch_size × world size``; the last one of a bucket is filled up
from the start of the same bucket), and the global batches in a seeded order. Rank ``r`` takes the ``r``-th
``batch_size`` of each global batch, so all ranks train on one shape per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep.data.order import keyed_random

_SDXL_LANDSCAPE = (  # (height, width), wide to square; the portrait shapes are these transposed
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024),
)  # fmt: skip
SDXL_BUCKETS = (*_SDXL_LANDSCAPE, (1024, 1024), *((w, h) for h, w in reversed(_SDXL_LANDSCAPE)))
PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "sdxl": SDXL_BUCKETS,
    "sd15": tuple((h // 2, w // 2) for h, w in SDXL_BUCKETS),
}

Bucket = tuple[int, ...]  # (height, width) or (frames, height, width)


def resolve_buckets(value: str | Sequence[Sequence[int]]) -> list[Bucket]:
    """``data.buckets`` as a list of tuples: a preset's shapes, or the listed ones.

    Raises:
        ValueError: an unknown preset name.
    """
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"Unknown bucket preset {value!r}; presets: {', '.join(PRESETS)} (or list [h, w] pairs).")
        return list(PRESETS[value])
    return [tuple(int(v) for v in b) for b in value]


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """The index of the bucket whose aspect ratio (width / height, compared in log space) is nearest the image's;
    the first such bucket on a tie."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][-1] / buckets[i][-2]) - ratio))


def bucket_problems(buckets: Sequence[Bucket], multiple: int) -> list[tuple[int, str]]:
    """``(index, problem)`` for each bucket whose height or width is not a multiple of ``multiple`` (the nearest
    multiples are suggested)."""
    problems = []
    for i, bucket in enumerate(buckets):
        *frames, h, w = bucket
        if h % multiple or w % multiple:
            fixed = [*frames, *(max(multiple, round(s / multiple) * multiple) for s in (h, w))]
            problems.append((i, f"{list(bucket)} has a side that is not a multiple of {multiple}; use {fixed}"))
    return problems


def check_buckets(buckets: Sequence[Bucket], multiple: int, why: str) -> None:
    """Raise one ``ValueError`` listing every bucket of ``bucket_problems`` (``why``: where ``multiple`` comes from).

    Raises:
        ValueError: ``data.buckets.<i>: ...`` for each bad bucket.
    """
    problems = bucket_problems(buckets, multiple)
    if problems:
        listed = "; ".join(f"data.buckets.{i}: {text}" for i, text in problems)
        raise ValueError(f"{listed}. Bucket sides must be multiples of {multiple} ({why}).")


def check_teacher_buckets(buckets: Sequence[Bucket], teacher: Any) -> None:
    """``check_buckets`` with the teacher's pixel multiple (``fewstep.models.backbones.pixel_multiple``)."""
    from fewstep.models.backbones import pixel_multiple

    check_buckets(buckets, pixel_multiple(teacher), "the VAE's downsampling × the backbone's patch size")


def image_sizes(files: Sequence[Path]) -> list[tuple[int, int]]:
    """``(height, width)`` of each image file, from its header only (nothing is decoded)."""
    from PIL import Image
    from tqdm.auto import tqdm

    sizes = []
    for file in tqdm(files, desc="image sizes", unit="img", disable=len(files) < 1000):
        with Image.open(file) as image:
            sizes.append((image.height, image.width))
    return sizes


def sized_conditioning(teacher: Any, size: Bucket, *conds: Any) -> tuple[Any, ...]:
    """``conds`` (e.g. ``cond, uncond``) with SDXL's size micro-conditioning (``time_ids``) set to the bucket's
    ``(height, width)``, as the SDXL pipeline sets it when it generates at that size; conditioning without
    ``time_ids`` (and None) comes back as it is."""
    from fewstep.models.prompts import sdxl_time_ids

    out = []
    for cond in conds:
        if cond is not None and cond.time_ids is not None:
            ids = sdxl_time_ids(teacher.pipeline, (size[-2], size[-1]), cond.time_ids.shape[0], cond.time_ids.dtype)
            cond = cond.replace(time_ids=ids.to(cond.time_ids.device))
        out.append(cond)
    return tuple(out)


class BucketSampler:
    """Stream positions → item indices such that each global batch (``global_batch`` positions from a multiple of
    it) holds one bucket's items. Same interface as ``fewstep.data.loader.IndexStream``.

    Args:
        item_buckets: the bucket index of every item.
        global_batch: samples of one optimizer micro-step on all ranks (``batch_size × world size``).
        seed: the run's seed.
        shuffle: seeded orders (off: items in file order within a bucket, buckets in turn).
    """

    def __init__(self, item_buckets: Sequence[int], global_batch: int, seed: int, shuffle: bool) -> None:
        self.members: dict[int, list[int]] = {}
        for item, bucket in enumerate(item_buckets):
            self.members.setdefault(bucket, []).append(item)
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        batches = sum(math.ceil(len(m) / global_batch) for m in self.members.values())
        self.epoch_samples = batches * global_batch  # positions per epoch (filled-up batches included)
        self._epoch, self._order = -1, []

    def epoch_plan(self, epoch: int) -> list[int]:
        """The item at each position of ``epoch``."""
        g, batches = self.global_batch, []
        for bucket in sorted(self.members):
            items = list(self.members[bucket])
            if self.shuffle:
                keyed_random(self.seed, epoch, "bucket", bucket).shuffle(items)
            filled = [items[k % len(items)] for k in range(math.ceil(len(items) / g) * g)]
            batches += [filled[k : k + g] for k in range(0, len(filled), g)]
        if self.shuffle:
            keyed_random(self.seed, epoch, "batches").shuffle(batches)
        return [item for batch in batches for item in batch]

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.epoch_samples)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self.epoch_plan(epoch)
            out.append(self._order[offset])
        return out
