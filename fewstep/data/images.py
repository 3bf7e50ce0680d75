"""Image grids: rows of sample tiles as one PNG (training sample grids, evaluation grids, the quickstart's grid).

Tiles are enlarged with nearest-neighbour so that tiny images (8×8 digits) stay readable; an optional ``gap`` of
mid-gray pixels separates neighbouring tiles.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

MIN_TILE_PIXELS = 64  # tiny images (digits are 8×8) are enlarged (nearest) so a grid is readable
GAP_VALUE = 0.5  # mid-gray between tiles


def grid_image(rows: list[Tensor], scale: int | None = None, gap: int = 0) -> Image.Image:
    """A PIL image of ``rows`` (each ``[n, c, h, w]`` in [0, 1], c = 1 or 3): one row of tiles per entry.

    Args:
        rows: the grid rows; every row shows as many tiles as the shortest one has.
        scale: the nearest-neighbour enlargement of each tile (default: enough for ``MIN_TILE_PIXELS``).
        gap: mid-gray pixels around and between the tiles.
    """
    n = min(r.shape[0] for r in rows)
    c, h, w = rows[0].shape[1:]
    scale = scale or max(1, math.ceil(MIN_TILE_PIXELS / max(h, w)))
    tiles = torch.stack([r[:n].float().clamp(0, 1).cpu() for r in rows])  # [rows, n, c, h, w]
    tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    tiles = F.pad(tiles, (0, gap, 0, gap), value=GAP_VALUE)  # a gap right of and below every tile
    height, width = tiles.shape[-2:]
    grid = tiles.permute(2, 0, 3, 1, 4).reshape(c, len(rows) * height, n * width)  # rows of tiles
    grid = F.pad(grid, (gap, 0, gap, 0), value=GAP_VALUE)  # and above / left of the first ones
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if c == 1 else np.ascontiguousarray(pixels), "L" if c == 1 else "RGB")


def save_sample_grid(rows: list[Tensor], path: Path, scale: int | None = None, gap: int = 0) -> Path:
    """Write ``grid_image(rows, scale, gap)`` as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, scale, gap).save(path)
    return path
