"""Image grids: rows of sample tiles as one PNG (training sample grids, evaluation grids, the quickstart's grid).

Tiles are enlarged with nearest-neighbour so that tiny images (8×8 digits) stay readable; an optional ``gap`` of
mid-gray pixels separates neighbouring tiles. Optional labels go in a white margin: one per row on the left (e.g.
the step count) and one per column on top (e.g. the class or prompt, cut to the tile's width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_TILE_PIXELS = 64  # tiny images (digits are 8×8) are enlarged (nearest) so a grid is readable
GAP_VALUE = 0.5  # mid-gray between tiles
LABEL_PAD = 3  # pixels around a label


def grid_image(
    rows: list[Tensor],
    scale: int | None = None,
    gap: int = 0,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A PIL image of ``rows`` (each ``[n, c, h, w]`` in [0, 1], c = 1 or 3): one row of tiles per entry.

    Args:
        rows: the grid rows; every row shows as many tiles as the shortest one has.
        scale: the nearest-neighbour enlargement of each tile (default: enough for ``MIN_TILE_PIXELS``).
        gap: mid-gray pixels around and between the tiles.
        row_labels: a label left of each row (``len(rows)`` of them).
        column_labels: a label above each column (the first ``n`` are used).
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
    image = Image.fromarray(pixels[..., 0] if c == 1 else np.ascontiguousarray(pixels), "L" if c == 1 else "RGB")
    if row_labels is None and column_labels is None:
        return image
    return _add_labels(image, (height, width), gap, row_labels, (list(column_labels)[:n] if column_labels else None))


def _add_labels(
    grid: Image.Image,
    tile: tuple[int, int],
    gap: int,
    row_labels: Sequence[str] | None,
    column_labels: Sequence[str] | None,
) -> Image.Image:
    """``grid`` in a white margin with ``row_labels`` on the left and ``column_labels`` on top (black text)."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    line_height = font.getbbox("Ag")[3] + 2 * LABEL_PAD
    left = int(max(measure.textlength(t, font=font) for t in row_labels)) + 2 * LABEL_PAD if row_labels else 0
    top = line_height if column_labels else 0
    white, black = (255, 0) if grid.mode == "L" else ((255, 255, 255), (0, 0, 0))
    out = Image.new(grid.mode, (grid.width + left, grid.height + top), white)
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    height, width = tile
    for i, text in enumerate(row_labels or []):
        y = top + gap + i * height + max(0, (height - gap - line_height) // 2)
        draw.text((LABEL_PAD, y + LABEL_PAD), text, fill=black, font=font)
    for j, text in enumerate(column_labels or []):
        text = _fit(draw, str(text), width - gap - LABEL_PAD, font)
        draw.text((left + gap + j * width + LABEL_PAD, LABEL_PAD), text, fill=black, font=font)
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, max_width: int, font: ImageFont.ImageFont) -> str:
    """``text``, cut and ended with ``...`` where it is wider than ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..." if text else ""


def save_sample_grid(
    rows: list[Tensor],
    path: Path,
    scale: int | None = None,
    gap: int = 0,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """Write ``grid_image(rows, scale, gap, row_labels, column_labels)`` as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, scale, gap, row_labels, column_labels).save(path)
    return path
