"""Moving digits: the clips are deterministic, the digit moves as recorded and bounces inside the frame."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.digits import DigitsDataset
from fewstep.data.moving_digits import DIGIT_SIZE, SPEEDS, MovingDigitsDataset, bounce


def test_bounce_reflects_at_both_walls():
    positions = bounce(torch.tensor([3]), torch.tensor([2]), num_frames=8, room=6)
    assert positions.tolist() == [[3, 5, 5, 3, 1, 1, 3, 5]]  # 3 → 5 → (7 reflected to) 5 → 3 → 1 → (−1 to) 1 …
    positions = bounce(torch.tensor([0, 16]), torch.tensor([-1, 1]), num_frames=4, room=16)
    assert positions.tolist() == [[0, 1, 2, 3], [16, 15, 14, 13]]


@pytest.fixture(scope="module")
def clips() -> MovingDigitsDataset:
    return MovingDigitsDataset("test", clips_per_digit=2)


def test_clips_show_the_digit_where_the_positions_say(clips):
    digits = DigitsDataset("test")
    assert clips.clips.shape == (2 * len(digits), 1, 8, 24, 24)
    assert clips.labels.tolist() == digits.labels[clips.digit_index].tolist()
    for i in (0, 7, 200, len(clips) - 1):
        x, label = clips[i]
        assert label == int(digits.labels[clips.digit_index[i]])
        for f in range(8):
            r, c = clips.positions[i, f].tolist()
            assert torch.equal(x[0, f, r : r + DIGIT_SIZE, c : c + DIGIT_SIZE], digits.images[clips.digit_index[i], 0])
            outside = x[0, f].clone()
            outside[r : r + DIGIT_SIZE, c : c + DIGIT_SIZE] = -1
            assert torch.all(outside == -1)  # one digit on a black frame


def test_motion_is_bounded_and_at_the_drawn_speeds(clips):
    steps = (clips.positions[:, 1:] - clips.positions[:, :-1]).abs()
    assert clips.positions.min() >= 0 and clips.positions.max() <= 24 - DIGIT_SIZE
    assert steps.max() <= max(SPEEDS)
    assert (steps > 0).float().mean() > 0.9  # moving on both axes, except where a bounce folds a step


def test_same_arguments_give_the_same_clips_and_splits_differ(clips):
    again = MovingDigitsDataset("test", clips_per_digit=2)
    assert torch.equal(again.clips, clips.clips) and torch.equal(again.positions, clips.positions)
    other = MovingDigitsDataset("test", clips_per_digit=2, seed=1)
    assert not torch.equal(other.positions, clips.positions)
    x, _ = clips.batch([0, 5])
    assert x.shape == (2, 1, 8, 24, 24)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_frames": 1}, "at least 2 frames"), ({"size": 8}, "wider than"), ({"clips_per_digit": 0}, "at least 1")],
)
def test_bad_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovingDigitsDataset("test", **kwargs)
