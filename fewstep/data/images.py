"""Image grids: rows of sample tiles as one PNG (training sample grids, evaluation grids, the quickstart's grid, the
contact sheet of ``fewstep sample``).

Tiles are enlarged with nearest-neighbour so that tiny images (8×8 digits) stay readable; an optional ``gap`` of
mid-gray pixels separates neighbouring tiles. Rows and columns can carry text labels (a prompt or class per row, a
seed per column), drawn in black on a white margin left of and above the tiles.
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
MAX_LABEL_CHARS = 40  # longer labels are cut, with "..."
LABEL_PAD = 4  # pixels of white around a label


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
        row_labels: one text per row, written left of it (cut to ``MAX_LABEL_CHARS``).
        column_labels: one text per column, written above it.

    Raises:
        ValueError: a label list whose length is not the number of rows / columns.
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
    for labels, count, what in ((row_labels, len(rows), "rows"), (column_labels, n, "columns")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} {what} of the grid; give one label per {what[:-1]}.")
    if not row_labels and not column_labels:
        return image
    return _labelled(image, (height, width), gap, list(row_labels or []), list(column_labels or []))


def _labelled(
    grid: Image.Image, tile: tuple[int, int], gap: int, row_labels: list[str], column_labels: list[str]
) -> Image.Image:
    """``grid`` on a white canvas with ``row_labels`` in a margin on the left and ``column_labels`` in a band on top,
    each centred on its row / column of tiles (``tile``: one tile's height and width including its gap)."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)

    def box(text: str) -> tuple[int, int, int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return int(left), int(top), int(right), int(bottom)

    rows = [_cut(text) for text in row_labels]
    columns = [_cut(text) for text in column_labels]
    margin = max((box(t)[2] for t in rows), default=0) + 2 * LABEL_PAD if rows else 0
    band = max((box(t)[3] for t in columns), default=0) + 2 * LABEL_PAD if columns else 0
    white, black = (255, 0) if grid.mode == "L" else ((255, 255, 255), (0, 0, 0))
    canvas = Image.new(grid.mode, (grid.width + margin, grid.height + band), white)
    canvas.paste(grid, (margin, band))
    draw = ImageDraw.Draw(canvas)
    (tile_h, tile_w), inner = tile, lambda size: size - gap  # the tile itself, without its gap
    for r, text in enumerate(rows):
        _, top, _, bottom = box(text)
        y = band + gap + r * tile_h + (inner(tile_h) - (bottom - top)) // 2 - top
        draw.text((LABEL_PAD, y), text, fill=black, font=font)
    for c, text in enumerate(columns):
        left, top, right, _ = box(text)
        x = margin + gap + c * tile_w + max(0, (inner(tile_w) - (right - left)) // 2) - left
        draw.text((x, LABEL_PAD - top), text, fill=black, font=font)
    return canvas


def _cut(text: str) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."


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
