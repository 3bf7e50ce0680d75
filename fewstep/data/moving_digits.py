"""Moving digits: a small real video data set built from scikit-learn's digits, for the video benchmark.

Each clip is one 8×8 digit moving in a straight line across a ``size × size`` black frame and bouncing off the
walls, ``num_frames`` frames long. Clips are ``[1, F, H, W]`` in ``[-1, 1]`` (background −1) with the digit's class
as label, the layout a pixel-space video model denoises (``[b, c, f, h, w]``).

Everything is drawn from ``seed`` and the clip's index, so the same arguments give the same clips on every
machine. Each digit of the split appears in ``clips_per_digit`` clips with different starts and velocities; the
train and test clips use the digits splits of ``fewstep.data.digits`` (the test digits stay held out).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.data.digits import DigitsDataset

DIGIT_SIZE = 8
NUM_FRAMES = 8
FRAME_SIZE = 24
SPEEDS = (-2, -1, 1, 2)  # pixels per frame, per axis: the digit always moves on both axes


def bounce(start: Tensor, velocity: Tensor, num_frames: int, room: int) -> Tensor:
    """Positions ``[..., F]`` of a point that starts at ``start`` and moves ``velocity`` per frame inside
    ``[0, room]``, reflected at both ends (a triangle wave of period ``2·room``)."""
    steps = torch.arange(num_frames)
    q = (start[..., None] + velocity[..., None] * steps).remainder(2 * room)
    return torch.where(q <= room, q, 2 * room - q)


def render(digits: Tensor, positions: Tensor, size: int) -> Tensor:
    """Clips ``[n, 1, F, size, size]`` with each 8×8 digit of ``digits`` ``[n, 1, 8, 8]`` (in ``[-1, 1]``) pasted at
    ``positions`` ``[n, F, 2]`` (top-left row, column per frame) on a −1 background."""
    n, num_frames = positions.shape[:2]
    clips = torch.full((n, 1, num_frames, size, size), -1.0)
    for i in range(n):
        for f in range(num_frames):
            r, c = (int(v) for v in positions[i, f])
            clips[i, 0, f, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = digits[i, 0]
    return clips


class MovingDigitsDataset(Dataset):
    """``(clip [1, F, H, W] float32 in [-1, 1], label int)`` items: the digits of one split, moving and bouncing.

    Args:
        split: ``"train"`` or ``"test"`` (``fewstep.data.digits``'s fixed split).
        num_frames: frames per clip (at least 2).
        size: the frame side in pixels (more than the digit's 8, so it has room to move).
        clips_per_digit: clips drawn for every digit of the split.
        seed: draws the starts and velocities (and the digits split).

    Attributes:
        positions: ``[n, F, 2]`` the digit's top-left corner (row, column) in every frame: the true motion.
        digit_index: ``[n]`` the row of ``DigitsDataset(split)`` each clip shows.
    """

    def __init__(
        self, split: str = "train", num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE, clips_per_digit: int = 4,
        seed: int = 0,
    ) -> None:  # fmt: skip
        if num_frames < 2:
            raise ValueError(f"MovingDigitsDataset needs at least 2 frames per clip; got num_frames={num_frames}.")
        if size <= DIGIT_SIZE:
            raise ValueError(
                f"MovingDigitsDataset frames must be wider than the {DIGIT_SIZE}-pixel digits; got {size}."
            )
        if clips_per_digit < 1:
            raise ValueError(f"clips_per_digit must be at least 1; got {clips_per_digit}.")
        digits = DigitsDataset(split, seed=seed)
        n = len(digits) * clips_per_digit
        rng = np.random.RandomState([seed, 0 if split == "train" else 1])
        room = size - DIGIT_SIZE
        start = torch.from_numpy(rng.randint(0, room + 1, size=(n, 2)))
        velocity = torch.from_numpy(rng.choice(SPEEDS, size=(n, 2)))
        self.positions: Tensor = bounce(start, velocity, num_frames, room).transpose(1, 2).contiguous()  # [n, F, 2]
        self.digit_index: Tensor = torch.arange(n) % len(digits)
        self.labels: Tensor = digits.labels[self.digit_index]
        self.clips: Tensor = render(digits.images[self.digit_index], self.positions, size)
        self.split, self.num_frames, self.size = split, num_frames, size

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.clips[i], int(self.labels[i])

    def batch(self, idx: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Clips ``[b, 1, F, H, W]`` in ``[-1, 1]`` and labels ``[b]`` of the rows ``idx``."""
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.clips[index], self.labels[index]


__all__ = ["DIGIT_SIZE", "FRAME_SIZE", "NUM_FRAMES", "MovingDigitsDataset", "bounce", "render"]
