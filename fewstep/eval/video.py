"""Video metrics as pure functions on per-frame features ``[B, F, D]`` (B clips, F frames, D features per frame).

* ``per_frame_fid``: the Fréchet distance between the frames of the student's clips and the teacher's, every frame
  treated as an image (``fewstep.eval.fid.frechet_distance`` on ``[B·F, D]``): per-image quality, blind to motion.
* ``frame_to_frame_distance``: the mean feature distance between consecutive frames of each clip ``[B]``;
  ``temporal_consistency`` compares the student's with the teacher's on the same prompts and seeds. A ratio well
  above 1 is flicker (consecutive frames differ more than the teacher's); well below 1 is a frozen clip (the student
  stopped moving).

* ``object_windows`` / ``centre_jumps`` / ``same_class_fraction``: the pieces of an object-level video metric for
  clips of one bright object on a dark background (the moving-digits benchmark, ``fewstep.eval.moving_digits``): a
  window that follows the object's centre of mass in every frame, how far that centre jumps between frames, and how
  many clips keep one predicted class in every frame.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewstep.eval.fid import frechet_distance


def _check_clips(features: Tensor, what: str) -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{what} must be per-frame features [B clips, F frames, D]; got {shape}.")
    return features.detach().double().cpu()


def per_frame_fid(student: Tensor, teacher: Tensor) -> float:
    """FID over frames: ``frechet_distance`` of the student's ``[B, F, D]`` frames to the teacher's ``[B', F', D]``."""
    s, t = _check_clips(student, "student"), _check_clips(teacher, "teacher")
    return frechet_distance(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))


def frame_to_frame_distance(clips: Tensor) -> Tensor:
    """Mean Euclidean feature distance between consecutive frames, per clip: ``[B]`` (needs F ≥ 2)."""
    x = _check_clips(clips, "clips")
    if x.shape[1] < 2:
        raise ValueError(f"Frame-to-frame distances need at least 2 frames per clip; got {x.shape[1]}.")
    return torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1).mean(dim=1)


def temporal_consistency(student: Tensor, teacher: Tensor) -> dict[str, Any]:
    """The student's mean frame-to-frame distance next to the teacher's and their ratio (student / teacher).

    Args:
        student: ``[B, F, D]`` per-frame features of the student's clips.
        teacher: ``[B, F, D]`` of the teacher's clips on the same prompts and seeds.

    Returns:
        ``{"student": float, "teacher": float, "ratio": float}`` (ratio ``inf`` for a frozen teacher and a moving
        student, 1 when both are frozen).
    """
    s = float(frame_to_frame_distance(student).mean())
    t = float(frame_to_frame_distance(teacher).mean())
    ratio = s / t if t > 0 else (1.0 if s == 0 else float("inf"))
    return {"student": s, "teacher": t, "ratio": ratio}


__all__ = ["frame_to_frame_distance", "per_frame_fid", "temporal_consistency"]


def centres_of_mass(frames: Tensor) -> Tensor:
    """Brightness centre of mass ``[..., 2]`` (row, column, in pixels) of frames ``[..., H, W]`` in ``[0, 1]``; the
    frame's centre for an all-black frame."""
    frames = frames.float().clamp(0, 1)
    h, w = frames.shape[-2:]
    mass = frames.sum(dim=(-2, -1))
    rows = torch.arange(h, dtype=frames.dtype, device=frames.device)
    cols = torch.arange(w, dtype=frames.dtype, device=frames.device)
    r = (frames.sum(dim=-1) * rows).sum(dim=-1)
    c = (frames.sum(dim=-2) * cols).sum(dim=-1)
    centre = torch.stack([r, c], dim=-1) / mass.clamp_min(1e-8)[..., None]
    middle = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=frames.dtype, device=frames.device)
    return torch.where(mass[..., None] > 0, centre, middle)


def object_windows(clips: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A ``size × size`` window around the object in every frame of clips ``[B, 1, F, H, W]`` in ``[0, 1]``.

    The window is centred on the frame's brightness centre of mass (rounded, kept inside the frame), so a classifier
    trained on centred ``size``-pixel objects can read each frame.

    Returns:
        ``(windows [B, F, 1, size, size], centres [B, F, 2])``: the crops, and the centres of mass (row, column).
    """
    if clips.ndim != 5 or clips.shape[1] != 1:
        raise ValueError(f"object_windows takes one-channel clips [B, 1, F, H, W]; got {tuple(clips.shape)}.")
    frames = clips[:, 0].float()  # [B, F, H, W]
    b, f, h, w = frames.shape
    if size > min(h, w):
        raise ValueError(f"A {size}-pixel window does not fit {h}×{w} frames.")
    centres = centres_of_mass(frames)
    top = (centres[..., 0] - (size - 1) / 2).round().clamp(0, h - size).long().reshape(-1)
    left = (centres[..., 1] - (size - 1) / 2).round().clamp(0, w - size).long().reshape(-1)
    offsets = torch.arange(size)
    rows = (top[:, None] + offsets)[:, :, None].expand(-1, size, size)
    cols = (left[:, None] + offsets)[:, None, :].expand(-1, size, size)
    flat = frames.reshape(b * f, h, w)
    windows = flat[torch.arange(b * f)[:, None, None], rows, cols]
    return windows.reshape(b, f, 1, size, size), centres


def centre_jumps(centres: Tensor) -> Tensor:
    """The distance ``[B, F − 1]`` in pixels the centre of mass ``[B, F, 2]`` moves from each frame to the next."""
    if centres.ndim != 3 or centres.shape[1] < 2:
        raise ValueError(f"centre_jumps takes centres [B, F >= 2, 2]; got {tuple(centres.shape)}.")
    return torch.linalg.vector_norm(centres[:, 1:] - centres[:, :-1], dim=-1)


def same_class_fraction(predicted: Tensor) -> float:
    """The fraction of clips whose predicted class ``[B, F]`` is the same in every frame."""
    if predicted.ndim != 2:
        raise ValueError(f"same_class_fraction takes per-frame classes [B, F]; got {tuple(predicted.shape)}.")
    return float((predicted == predicted[:, :1]).all(dim=1).float().mean())
