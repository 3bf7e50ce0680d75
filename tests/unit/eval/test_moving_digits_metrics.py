"""Moving-digits video metrics: windows that follow the digit, per-frame quality and the temporal columns."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.moving_digits import MovingDigitsDataset
from fewstep.eval.moving_digits import MAX_TRUE_JUMP, MovingDigitsMetrics, quantised
from fewstep.eval.video import centre_jumps, centres_of_mass, object_windows, same_class_fraction


def test_window_follows_a_moving_square():
    clips = torch.zeros(1, 1, 3, 12, 12)
    for f, (r, c) in enumerate([(0, 0), (2, 3), (8, 8)]):
        clips[0, 0, f, r : r + 4, c : c + 4] = 1.0
    windows, centres = object_windows(clips, 4)
    assert torch.all(windows == 1)  # every window is exactly the square
    assert centres[0].tolist() == [[1.5, 1.5], [3.5, 4.5], [9.5, 9.5]]
    assert centre_jumps(centres)[0].tolist() == pytest.approx([13**0.5, 61**0.5])


def test_black_frame_centre_and_class_agreement():
    assert centres_of_mass(torch.zeros(5, 7)).tolist() == [2.0, 3.0]
    assert same_class_fraction(torch.tensor([[1, 1, 1], [2, 2, 3]])) == 0.5
    with pytest.raises(ValueError, match="one-channel clips"):
        object_windows(torch.zeros(2, 3, 4, 8, 8), 4)


@pytest.fixture(scope="module")
def metrics() -> MovingDigitsMetrics:
    return MovingDigitsMetrics(reference_clips=400)


@pytest.fixture(scope="module")
def real() -> tuple[torch.Tensor, torch.Tensor]:
    test = MovingDigitsDataset("test", clips_per_digit=2)
    return quantised((test.clips[:300] + 1) / 2), test.labels[:300]


def test_real_clips_score_as_real(metrics, real):
    clips, labels = real
    m = metrics.compute(clips, labels)
    assert m["frame_fid"] < 8 and m["frame_accuracy"] > 0.97 and m["same_class"] > 0.95
    assert m["teleports"] == 0 and m["jump_error"] < 0.6
    assert 1.5 < m["com_jump"] <= MAX_TRUE_JUMP


def test_frozen_and_shuffled_clips_are_caught(metrics, real):
    clips, labels = real
    frozen = metrics.compute(clips[:, :, :1].expand_as(clips).contiguous(), labels)
    assert frozen["com_jump"] == 0 and frozen["jump_error"] > 1.5  # no motion: per-frame quality alone is blind to it
    assert frozen["frame_accuracy"] > 0.97
    # every frame from another clip: the class changes and the digit jumps across the frame
    shuffled = torch.stack([clips[(torch.arange(len(clips)) * 7 + f) % len(clips), :, f] for f in range(8)], dim=2)
    m = metrics.compute(shuffled, labels)
    assert m["same_class"] < 0.2 and m["teleports"] > 0.5 and m["frame_accuracy"] < 0.3
    noise = metrics.compute(torch.rand_like(clips), labels)
    assert noise["frame_fid"] > 20 * metrics.compute(clips, labels)["frame_fid"]
