"""The moving-digits video metrics: per-frame quality in the digits classifier's feature space, and whether the clip
holds together in time.

A frame of a moving-digits clip (``fewstep.data.moving_digits``) is read through an 8×8 window that follows the
digit's brightness centre of mass (``fewstep.eval.video.object_windows``), so the shipped digits classifier, trained
on centred 8×8 digits, scores every frame. The reference windows are taken the same way from real training clips,
so the window's own rounding costs the real data and the samples alike.

=====================  ====================================================================================  =========
column                 what                                                                                  better
=====================  ====================================================================================  =========
``frame_fid``          Fréchet distance of the frame windows' classifier features to the real ones'          lower
``frame_accuracy``     fraction of frames the classifier assigns to the clip's label                         higher
``precision``          fraction of clips whose middle frame is inside the real middle frames' k-NN manifold  higher
``recall``             fraction of real middle frames inside the clips' middle frames' k-NN manifold (k = 3)  higher
``diversity``          mean pairwise feature distance between middle frames of clips of one class           –
``same_class``         fraction of clips whose predicted class is the same in every frame                    higher
``com_jump``           mean distance (px) the centre of mass moves between consecutive frames                –
``jump_error``         mean absolute gap between a clip's mean jump and the real clips' mean jump (px)       lower
``teleports``          fraction of frame steps that jump further than any real motion (+1 px)                lower
=====================  ====================================================================================  =========

Real clips move 1–2 px per frame on each axis (``SPEEDS``): the centre jumps by 1.4–2.8 px, less at a bounce.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fewstep.data.moving_digits import DIGIT_SIZE, SPEEDS, MovingDigitsDataset
from fewstep.eval.diversity import diversity, precision_recall
from fewstep.eval.fid import frechet_distance
from fewstep.eval.video import centre_jumps, object_windows, same_class_fraction

MAX_TRUE_JUMP = math.hypot(max(SPEEDS), max(SPEEDS))  # the fastest real motion per frame (px)
TELEPORT_MARGIN = 1.0  # px beyond the fastest real motion that count as a teleport


class MovingDigitsMetrics:
    """Every column above for clips ``[n, 1, F, H, W]`` in ``[0, 1]`` with their labels ``[n]``.

    Args:
        classifier: the digits classifier (``None``: the shipped ``digits-classifier`` asset), as ``DigitsMetrics``.
        reference_clips: real training clips (``MovingDigitsDataset('train')``, quantised to 8 bits) whose frames are
            the FID and precision / recall reference.
        num_frames, size: the clip shape of the reference (the teacher's).
    """

    def __init__(
        self, classifier: Any = None, reference_clips: int = 1000, num_frames: int | None = None,
        size: int | None = None,
    ) -> None:  # fmt: skip
        from fewstep.eval.digits import DigitsMetrics

        self.digits = DigitsMetrics(classifier)
        kwargs = {k: v for k, v in (("num_frames", num_frames), ("size", size)) if v is not None}
        real = MovingDigitsDataset("train", **kwargs)
        clips = quantised((real.clips[:reference_clips] + 1) / 2)
        windows, centres = object_windows(clips, DIGIT_SIZE)
        self.reference_features = self.features(windows.flatten(0, 1))  # [n·F, D]
        self.reference_middle = self.reference_features.reshape(*windows.shape[:2], -1)[:, windows.shape[1] // 2]
        self.true_jump = float(centre_jumps(centres).mean())
        self.num_reference = int(clips.shape[0])

    def features(self, frames: Tensor) -> Tensor:
        """The classifier's features ``[m, D]`` of 8×8 frame windows ``[m, 1, 8, 8]`` in ``[0, 1]``."""
        with torch.no_grad():
            return torch.cat([self.digits.feature_net(chunk) for chunk in frames.split(self.digits.batch_size)])

    def compute(self, clips: Tensor, labels: Tensor) -> dict[str, float]:
        """The metrics of one row of clips ``[n, 1, F, H, W]`` in ``[0, 1]`` conditioned on ``labels`` ``[n]``."""
        windows, centres = object_windows(clips.float(), DIGIT_SIZE)
        n, f = windows.shape[:2]
        frames = windows.flatten(0, 1)
        features = self.features(frames)
        predicted = self.digits.predict(frames).reshape(n, f)
        frame_labels = labels.long().cpu()[:, None].expand(n, f)
        jumps = centre_jumps(centres)
        # one frame per clip: the frames of one clip are near-copies, which would shrink every k-NN radius to the clip
        middle = features.reshape(n, f, -1)[:, f // 2]
        real = self.reference_middle[:n]  # precision / recall want sets of equal size
        precision, recall = precision_recall(real, middle[: real.shape[0]])
        return {
            "frame_fid": frechet_distance(features, self.reference_features),
            "frame_accuracy": float((predicted == frame_labels).float().mean()),
            "precision": precision,
            "recall": recall,
            "diversity": diversity(middle, labels.long().cpu()),
            "same_class": same_class_fraction(predicted),
            "com_jump": float(jumps.mean()),
            "jump_error": float((jumps.mean(dim=1) - self.true_jump).abs().mean()),
            "teleports": float((jumps > MAX_TRUE_JUMP + TELEPORT_MARGIN).float().mean()),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "features": "fewstep digits classifier on 8x8 windows that follow each frame's centre of mass",
            "reference": f"{self.num_reference} clips of MovingDigitsDataset('train'), every frame",
            "true_mean_jump_px": round(self.true_jump, 4),
            "teleport_threshold_px": round(MAX_TRUE_JUMP + TELEPORT_MARGIN, 4),
        }


def quantised(clips: Tensor) -> Tensor:
    """Clips in ``[0, 1]`` rounded to 8 bits, as sampled clips are (``fewstep.eval.harness.to_uint8``)."""
    return (clips.float().clamp(0, 1) * 255).round() / 255


__all__ = ["MAX_TRUE_JUMP", "MovingDigitsMetrics", "quantised"]
