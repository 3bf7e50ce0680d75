"""Video clips read with PyAV (``pip install 'fewstep[video]'``): the one clip decoder of every video source (WebDataset
shards hold a video's bytes, video folders its file) and a cheap frame count for checking a folder before training.

A clip is ``num_frames`` frames, every ``frame_stride``-th from the first, so it spans ``(num_frames − 1)·frame_stride
+ 1`` frames of the video (``clip_span``). Each frame goes through ``crop_to``, the resize / center-crop rule of every
image source.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.data.image_folder import crop_to

VIDEO_FILE_EXTENSIONS = ("mp4", "webm", "mkv", "gif")  # what a video folder reads (FFmpeg's demuxers)
PYAV_HINT = "install PyAV: pip install 'fewstep[video]' (or pip install av)"


class SampleError(ValueError):
    """A sample that cannot be used; the message says why."""


def require_pyav() -> None:
    """Raise an ``ImportError`` naming the install command when PyAV is missing."""
    try:
        import av  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Reading video needs PyAV, which is not installed: {PYAV_HINT}.") from err


def clip_span(num_frames: int, frame_stride: int = 1) -> int:
    """Frames of the video a clip covers: ``(num_frames − 1)·frame_stride + 1``."""
    return (num_frames - 1) * frame_stride + 1


def _open(source: bytes | str | Path) -> Any:  # an av container
    import av

    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))


def decode_clip(
    source: bytes | str | Path, size: int | tuple[int, int], num_frames: int, frame_stride: int = 1
) -> Tensor:
    """``num_frames`` frames of a video (its bytes or its file; every ``frame_stride``-th frame from the first), each
    through ``crop_to``: ``[3, num_frames, h, w]`` in [-1, 1].

    Raises:
        SampleError: the video cannot be decoded or is too short.
    """
    import av

    frames, total = [], 0
    try:
        with _open(source) as container:
            for total, frame in enumerate(container.decode(video=0), start=1):
                if (total - 1) % frame_stride == 0:
                    frames.append(crop_to(frame.to_image(), size))
                if len(frames) == num_frames:
                    break
    except (av.FFmpegError, OSError, ValueError, IndexError) as err:
        raise SampleError(f"its video could not be decoded ({type(err).__name__}: {err})") from err
    if len(frames) < num_frames:
        raise SampleError(
            f"its video has {total} frames, {len(frames)} at stride {frame_stride}; {num_frames} are needed"
        )
    return torch.stack(frames, dim=1)  # [3, f, h, w]


def count_frames(source: bytes | str | Path, at_least: int) -> int:
    """The video's frame count, or ``at_least`` when it has that many: the container's own count when its header
    holds one (MP4, MKV with an index), else frames demuxed-and-decoded up to ``at_least`` (WebM, GIF; no resizing).

    Raises:
        SampleError: the file is not a video PyAV can open.
    """
    import av

    try:
        with _open(source) as container:
            if not container.streams.video:
                raise SampleError("it holds no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return min(int(stream.frames), at_least)
            total = 0
            for total, _ in enumerate(container.decode(video=0), start=1):
                if total >= at_least:
                    break
            return total
    except (av.FFmpegError, OSError, ValueError, IndexError) as err:
        raise SampleError(f"its video could not be read ({type(err).__name__}: {err})") from err
