"""Video folders (``data.source: image_folder`` with ``data.num_frames``) and the clip shape every video source must
agree on with its teacher.

A video folder is an image folder whose ``metadata.jsonl`` names video files (mp4, webm, mkv, gif) instead of images:
the same ``file_name`` / caption-column rules (``ImageFolderDataset``). Each item trains as one clip, ``num_frames``
frames every ``frame_stride``-th from the first, each resized and center-cropped to ``data.resolution``
(``fewstep.data.clips.decode_clip``), then encoded by the teacher's video VAE to ``[c, f, h, w]`` latents.

Unusable files. Before training every file is probed (its frame count from the container header, else by decoding up to
the clip's span): files too short for the clip and files PyAV cannot read are skipped and counted, the first ones named
in the log, and a summary line says how many; when no file is usable, the folder is refused at once. A file that
still fails mid-run (damaged past its header) is skipped and counted too, its place in the batch taken by a copy of
the batch's first good clip, as WebDataset shards do; every epoch ends with the skip summary in the log.

Clip shape. ``prepare_video_data`` checks ``data.num_frames`` and ``data.resolution`` against the teacher's VAE and
backbone (``fewstep.models.backbones.video_size_problems``: ``4k + 1`` frames for Wan, ``8k + 1`` for LTX-Video, sides
a multiple of the VAE × patch size) before any model work, and makes them the pipeline's default video size, which is
what data-free batches (``data.source: prompts``) and sample grids draw their latents at, and what the first frames of
an image-to-video teacher are prepared for (``fewstep.data.first_frames``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.data.clips import VIDEO_FILE_EXTENSIONS, SampleError, clip_span, count_frames, decode_clip, require_pyav
from fewstep.data.image_folder import ImageFolderDataset, LatentCache

logger = logging.getLogger(__name__)

WARN_SKIPS = 10  # skipped files named in the log one by one; all are counted
PROBE_BAR_FILES = 256  # folders at least this large show a progress bar while they are probed
TOO_SHORT, UNREADABLE = "too short", "unreadable"


class VideoFolderDataset:
    """``dataset[i] = (video path, caption)`` over the usable files of ``<path>/metadata.jsonl``.

    Args:
        path: the folder.
        caption_column: the caption key in each metadata line (``data.caption_column``).
        num_frames: frames per clip (``data.num_frames``).
        frame_stride: take every ``frame_stride``-th frame (``data.frame_stride``).

    Attributes:
        skipped_files: ``(file, kind, why)`` for each file left out (kind ``TOO_SHORT`` or ``UNREADABLE``).

    Raises:
        ValueError: no file of the folder gives a clip.
    """

    def __init__(self, path: str | Path, caption_column: str = "text", num_frames: int = 1, frame_stride: int = 1):
        require_pyav()
        folder = ImageFolderDataset(path, caption_column)  # the metadata.jsonl rules of image folders
        self.root, self.num_frames, self.frame_stride = folder.root, int(num_frames), int(frame_stride)
        span = clip_span(self.num_frames, self.frame_stride)
        self.items: list[tuple[Path, str]] = []
        self.skipped_files: list[tuple[Path, str, str]] = []
        self.left_out = 0
        bar = tqdm(folder.items, desc="probe videos", unit="file", disable=len(folder.items) < PROBE_BAR_FILES)
        for file, caption in bar:
            problem = self._problem(file, span)
            if problem is None:
                self.items.append((file, caption))
            else:
                self.skip(file, *problem)
        self.left_out = len(self.skipped_files)  # files the probe dropped (a file failing later stays in items)
        if not self.items:
            raise ValueError(
                f"No video in {self.root} gives a clip of {self.num_frames} frames at stride {self.frame_stride} "
                f"({span} frames of video): {self.summary()}. Lower data.num_frames or data.frame_stride, or fix "
                "the files."
            )
        if self.skipped_files:
            logger.warning("%s", self.summary())

    def _problem(self, file: Path, span: int) -> tuple[str, str] | None:
        """``(kind, why)`` when ``file`` cannot give a clip, else None."""
        if file.suffix.lower().lstrip(".") not in VIDEO_FILE_EXTENSIONS:
            return UNREADABLE, f"not a video file ({', '.join(VIDEO_FILE_EXTENSIONS)})"
        try:
            frames = count_frames(file, span)
        except SampleError as err:
            return UNREADABLE, str(err)
        if frames < span:
            return TOO_SHORT, (
                f"its video has {frames} frames; {self.num_frames} at stride {self.frame_stride} need {span}"
            )
        return None

    def skip(self, file: Path, kind: str, why: str) -> None:
        """Count ``file`` as skipped; the first ``WARN_SKIPS`` are named in the log."""
        if len(self.skipped_files) < WARN_SKIPS:
            logger.warning("skipped %s: %s", file, why)
        self.skipped_files.append((file, kind, why))

    def summary(self) -> str:
        """One line: how many files were skipped, of which kind, and the first one with its reason."""
        total = len(self.items) + self.left_out
        kinds = {kind: sum(k == kind for _, k, _ in self.skipped_files) for kind in (TOO_SHORT, UNREADABLE)}
        if not self.skipped_files:
            return f"video folder {self.root}: all {total} files usable"
        file, _, why = self.skipped_files[0]
        return (
            f"video folder {self.root}: skipped {len(self.skipped_files)} file(s) of {total} "
            f"({kinds[TOO_SHORT]} too short, {kinds[UNREADABLE]} unreadable); first: {file.name}: {why}"
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Path, str]:
        return self.items[i]


def clip_key(size: int | tuple[int, int], num_frames: int, frame_stride: int) -> str:
    """What a clip's latent depends on besides its file: the crop size, the frame count and the stride."""
    return f"{size}|{num_frames}f|stride{frame_stride}"


def encode_clips(
    files: list[Path],
    size: int | tuple[int, int],
    num_frames: int,
    frame_stride: int,
    encode: Callable[[Tensor], Tensor],
    cache: LatentCache | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> tuple[list[Tensor | None], dict[int, str]]:
    """Latents ``[c, f, h, w]`` (float32, CPU) for ``files``: cached ones are read, the rest decoded and encoded in one
    call. A file whose clip cannot be decoded gets None, and ``failed[i]`` says why.

    Args:
        encode: clips ``[n, 3, F, H, W]`` in [-1, 1] → latents ``[n, c, f, h, w]`` (the teacher's VAE, normalised).
        num_workers: threads that decode clips (0: in this thread).
    """
    key = clip_key(size, num_frames, frame_stride)
    latents: list[Tensor | None] = [cache.get(f, key) if cache is not None else None for f in files]
    todo = [i for i, lat in enumerate(latents) if lat is None]

    def decode(file: Path) -> Tensor | str:
        try:
            return decode_clip(file, size, num_frames, frame_stride)
        except SampleError as err:
            return str(err)

    if num_workers > 0 and len(todo) > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            clips = list(pool.map(decode, [files[i] for i in todo]))
    else:
        clips = [decode(files[i]) for i in todo]
    failed = {i: clip for i, clip in zip(todo, clips) if isinstance(clip, str)}
    good = [(i, clip) for i, clip in zip(todo, clips) if not isinstance(clip, str)]
    if good:
        with torch.no_grad():
            encoded = encode(torch.stack([clip for _, clip in good]).to(device)).float().cpu()  # [n, c, f, h, w]
        for (i, _), lat in zip(good, encoded):
            latents[i] = lat
            if cache is not None:
                cache.put(files[i], key, lat)
    return latents, failed


def clip_first_frames(files: list[Path], size: int | tuple[int, int], cache: LatentCache | None = None) -> Tensor:
    """The first frame of each file's clip, ``[b, 3, h, w]`` in [-1, 1]: the video's frame 0 through the clip decoder
    and its crop (``decode_clip``), so it equals the clip's pixels ``[:, 0]`` the VAE encodes, at any frame stride.
    Kept in ``cache`` next to the clip's latents (an image-to-video teacher's first frame is read once per file).

    Raises:
        SampleError: a file whose first frame cannot be decoded.
    """
    key = f"{size}|first frame"
    frames = []
    for file in files:
        frame = cache.get(file, key) if cache is not None else None
        if frame is None:
            frame = decode_clip(file, size, 1)[:, 0]  # [3, h, w]
            if cache is not None:
                cache.put(file, key, frame)
        frames.append(frame)
    return torch.stack(frames)


def clip_shape_problems(data_cfg: Any, teacher: Any) -> list[tuple[str, str]]:
    """``(data key, problem)`` for each way the recipe's clips do not fit the teacher (empty: they fit).

    ``data.num_frames`` with an image teacher; a frame count the video VAE cannot take (``frame_count_problem``: Wan
    ``4k + 1``, LTX-Video ``8k + 1``); sides that are not a multiple of the VAE's spatial factor × the backbone's patch
    (``video_size_problems``), at ``data.resolution`` or the pipeline's default size. Each problem names the nearest
    valid values. The teacher's configs suffice: ``fewstep validate`` asks a teacher built on the meta device
    (``fewstep.plan.meta.config_teacher``), training the loaded one (``prepare_video_data``).
    """
    from fewstep.models.backbones import (
        frame_count_problem,
        is_video_pipeline,
        pixel_frame_problem,
        video_defaults,
        video_size_problems,
    )

    frames, pipe = data_cfg.num_frames, teacher.pipeline
    if not takes_clips(teacher):
        if frames is None:
            return []
        return [("num_frames", f"asks for video, but the teacher {teacher.family!r} is an image model: remove "
                               "data.num_frames, or distill a video teacher (wan21, wan22, ltx, "
                               "cogvideox)")]  # fmt: skip
    if frames is None and data_cfg.resolution is None:
        return []
    _, height, width = video_defaults(pipe)
    if data_cfg.resolution is not None:
        height = width = int(data_cfg.resolution)
    if frames is None:
        problem = None
    elif is_video_pipeline(pipe):
        problem = frame_count_problem(pipe, frames, teacher.family)
    else:  # pixel clips (wan_class): whole temporal patches
        problem = pixel_frame_problem(teacher, frames)
    problems = [("num_frames", problem)] if problem else []
    return problems + [("resolution", side) for side in video_size_problems(teacher, None, height, width)]


def takes_clips(teacher: Any) -> bool:
    """Whether the teacher denoises clips: a video pipeline (its VAE compresses time), or a pixel video model
    (``wan_class``, e.g. the moving-digits teacher)."""
    from fewstep.models.backbones import is_video_pipeline

    return is_video_pipeline(teacher.pipeline) or getattr(teacher, "family", None) == "wan_class"


def prepare_video_data(data_cfg: Any, teacher: Any) -> None:
    """Check the recipe's clip shape against the teacher before any model work (``clip_shape_problems``), and make it
    the teacher's default video size (what data-free batches, sample grids and image-to-video first frames are made
    at). Does nothing for a video teacher without ``data.num_frames`` and ``data.resolution``.

    Raises:
        ValueError: ``data.num_frames`` with an image teacher, or a frame count or resolution the VAE cannot take
            (the message names the nearest valid values).
    """
    from fewstep.models.backbones import video_defaults

    frames, pipe = data_cfg.num_frames, teacher.pipeline
    problems = clip_shape_problems(data_cfg, teacher)
    if not takes_clips(teacher):
        if problems:
            raise ValueError(f"data.num_frames={frames} {problems[0][1]}.")
        return
    if frames is None and data_cfg.resolution is None:
        return
    default_frames, height, width = video_defaults(pipe)
    if data_cfg.resolution is not None:
        height = width = int(data_cfg.resolution)
    if problems:
        given = [key for key in ("num_frames", "resolution") if getattr(data_cfg, key) is not None]
        keys = " / ".join(f"data.{key}" for key in given)
        raise ValueError(
            f"{keys} ({frames or default_frames} frames, {height}×{width}) do not fit the teacher: "
            f"{'; '.join(problem for _, problem in problems)}."
        )
    pipe.default_video_size = (int(frames or default_frames), height, width)
