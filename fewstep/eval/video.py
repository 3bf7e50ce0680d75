"""Video metrics as pure functions on per-frame features ``[B, F, D]`` (B clips, F frames, D features per frame).

* ``per_frame_fid``: the Fréchet distance between the frames of the student's clips and the teacher's, every frame
  treated as an image (``fewstep.eval.fid.frechet_distance`` on ``[B·F, D]``): per-image quality, blind to motion.
* ``frame_to_frame_distance``: the mean feature distance between consecutive frames of each clip ``[B]``;
  ``temporal_consistency`` compares the student's with the teacher's on the same prompts and seeds. A ratio well
  above 1 is flicker (consecutive frames differ more than the teacher's); well below 1 is a frozen clip (the student
  stopped moving).

The evaluation harness samples images today; these functions are wired into it once video targets exist.
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
