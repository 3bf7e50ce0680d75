"""Image folders with captions (the diffusers / HF ``imagefolder`` convention) encoded to teacher latents.

A folder holds images and a ``metadata.jsonl`` with one JSON object per line: ``{"file_name": "a.png", "text": ...}``
(the caption column is configurable). Images are resized to cover ``resolution`` (or their bucket, ``data.buckets``)
and center-cropped to it (``crop_to``, the rule of every image source), then encoded once through the teacher's VAE;
latents are cached on disk keyed by the file (path, size, mtime), the resolution and the VAE, so later epochs and
later runs read them back instead of encoding again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

METADATA = "metadata.jsonl"


def fewstep_cache_dir() -> Path:
    """``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``: the root of every on-disk cache."""
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep").expanduser()


def crop_to(image: Image.Image, size: int | tuple[int, int]) -> Tensor:
    """``image`` resized (bicubic) to cover ``size`` and center-cropped to it: ``[3, h, w]`` RGB in [-1, 1].

    ``size`` is a side (a square) or ``(height, width)`` (a bucket). The one resize/crop rule of every image source.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    image = image.convert("RGB")
    w, h = image.size
    scale = max(width / w, height / h)  # the smallest scale that covers the target
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # [3, h, w], 0..255
    return pixels / 127.5 - 1.0


def load_image(source: str | Path | bytes, size: int | tuple[int, int]) -> Tensor:
    """An image file (a path, or its bytes) through ``crop_to(image, size)``: ``[3, h, w]`` in [-1, 1].

    Raises:
        OSError: the file is not an image PIL can read, or it is truncated.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return crop_to(image, size)


class ImageFolderDataset:
    """``dataset[i] = (image path, caption)`` from ``<path>/metadata.jsonl``.

    Args:
        path: the folder.
        caption_column: the caption key in each metadata line (``data.caption_column``).
    """

    def __init__(self, path: str | Path, caption_column: str = "text") -> None:
        self.root = Path(path)
        meta = self.root / METADATA
        if not meta.is_file():
            raise FileNotFoundError(
                f"{str(meta)!r} does not exist. data.source=image_folder needs a folder with images and a "
                f"{METADATA} holding one JSON object per line, e.g. "
                f'{{"file_name": "0001.png", "{caption_column}": "a photo of a cat"}}.'
            )
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("file_name", caption_column) if k not in row]
            if missing:
                raise ValueError(
                    f"{meta}:{n} lacks {missing} (keys: {sorted(row)}). Every line needs `file_name` and the caption "
                    f"column {caption_column!r} (set data.caption_column to the key your captions use)."
                )
            file = self.root / row["file_name"]
            if not file.is_file():
                raise FileNotFoundError(f"{meta}:{n} names {row['file_name']!r}, which is not in {self.root}.")
            self.items.append((file, str(row[caption_column])))
        if not self.items:
            raise ValueError(f"{meta} lists no images.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Path, str]:
        return self.items[i]


class LatentCache:
    """Latents on disk, one safetensors file per (image file, resolution) under a directory per VAE. ``resolution``
    may be any key the latent depends on besides the file (a video clip's: ``fewstep.data.video_folder.clip_key``).

    Args:
        vae_key: identifies the encoder (e.g. the teacher's ``pretrained`` and dtype); another VAE, another cache.
        root: defaults to ``fewstep_cache_dir() / "latents"``.
    """

    def __init__(self, vae_key: str, root: str | Path | None = None) -> None:
        base = Path(root) if root is not None else fewstep_cache_dir() / "latents"
        self.dir = base / hashlib.sha1(vae_key.encode()).hexdigest()[:16]

    def path(self, file: Path, resolution: int | tuple[int, int] | str) -> Path:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{resolution}"
        return self.dir / f"{hashlib.sha1(key.encode()).hexdigest()}.safetensors"

    def get(self, file: Path, resolution: int | tuple[int, int] | str) -> Tensor | None:
        path = self.path(file, resolution)
        return load_file(path)["latent"] if path.is_file() else None

    def put(self, file: Path, resolution: int | tuple[int, int] | str, latent: Tensor) -> None:
        path = self.path(file, resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"latent": latent.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, path)  # atomic: concurrent ranks never see a half-written file


def encode_items(
    files: list[Path],
    resolution: int | tuple[int, int],
    encode: Callable[[Tensor], Tensor],
    cache: LatentCache | None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Tensor:
    """Latents ``[b, c, h, w]`` (float32) for ``files``: cached ones are read, the rest encoded in one call.

    Args:
        resolution: a side, or ``(height, width)`` (a bucket).
        encode: images ``[n, 3, H, W]`` in [-1, 1] → latents ``[n, c, h, w]`` (the teacher's VAE, normalised).
        num_workers: threads that decode images (0: in this thread).
    """
    latents: list[Tensor | None] = [cache.get(f, resolution) if cache is not None else None for f in files]
    todo = [i for i, lat in enumerate(latents) if lat is None]
    if todo:
        paths = [files[i] for i in todo]
        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:
                images = list(pool.map(lambda f: load_image(f, resolution), paths))
        else:
            images = [load_image(f, resolution) for f in paths]
        with torch.no_grad():
            encoded = encode(torch.stack(images).to(device)).float().cpu()
        for i, lat in zip(todo, encoded):
            latents[i] = lat
            if cache is not None:
                cache.put(files[i], resolution, lat)
    return torch.stack(latents).to(device)  # type: ignore[arg-type]
