"""Video files from frames: an MP4 (H.264) through PyAV when it is installed (``pip install 'fewstep[video]'``),
otherwise an animated WebP or GIF through PIL.

``write_video(frames, path, fps)`` takes a ``(frames, H, W, C)`` ``uint8`` array (C = 1 or 3) and picks the container
from the file suffix. H.264 in ``yuv420p`` needs even sides, so an MP4 repeats the last row / column of odd-sized
frames; WebP is written lossless; GIF quantises to a 256-colour palette (exact for grayscale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_FORMATS = ("mp4", "webp", "gif")
DEFAULT_FPS = 8
MP4_CRF = 12  # x264 constant rate factor: near-lossless (0 is lossless, 23 is x264's default)


def has_pyav() -> bool:
    """Whether PyAV (``av``) can be imported, so MP4 can be written."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def default_video_format() -> str:
    """``mp4`` when PyAV is installed, else ``webp``."""
    return "mp4" if has_pyav() else "webp"


def check_video_format(name: str) -> str:
    """``name`` lower-cased, one of ``VIDEO_FORMATS``; ``mp4`` needs PyAV.

    Raises:
        ValueError: an unknown format, or ``mp4`` without PyAV (the message says how to install it).
    """
    fmt = str(name).lower().lstrip(".")
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"Unknown video format {name!r}; choose one of {', '.join(VIDEO_FORMATS)}.")
    if fmt == "mp4" and not has_pyav():
        raise ValueError(
            "Writing MP4 needs PyAV, which is not installed: `pip install 'fewstep[video]'` (or `pip install av`), or "
            "choose webp or gif."
        )
    return fmt


def write_video(frames: np.ndarray, path: str | Path, fps: int = DEFAULT_FPS) -> Path:
    """Write ``frames`` as a video; the format is the suffix of ``path`` (``.mp4``, ``.webp`` or ``.gif``).

    Args:
        frames: ``(num_frames, H, W, C)`` ``uint8``, C = 1 (grayscale) or 3 (RGB).
        path: the file to write (its folder is created).
        fps: frames per second.

    Returns:
        ``path``.

    Raises:
        ValueError: ``frames`` of another shape or dtype, ``fps < 1`` or an unknown suffix.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(
            f"Video frames must be a (frames, H, W, C) uint8 array with C = 1 or 3 and at least one frame; got shape "
            f"{tuple(frames.shape)}, dtype {frames.dtype}."
        )
    if fps < 1:
        raise ValueError(f"fps must be >= 1; got {fps}.")
    path = Path(path)
    fmt = check_video_format(path.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mp4":
        _write_mp4(frames, path, fps)
        return path
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    duration_ms = round(1000 / fps)
    extra = {"lossless": True} if fmt == "webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, **extra)
    return path


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    import av

    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p: even sides
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
