"""A tiny captioned image folder for runs that need image-text data and have none (tests, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def captioned_noise_images(folder: Path, count: int = 2, size: int = 16) -> Path:
    """``folder`` as an image folder with captions: ``count`` seeded RGB noise PNGs of ``size`` px and their
    ``metadata.jsonl`` (text "pattern i"), the data of the tiny text-to-image runs."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"pattern {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
