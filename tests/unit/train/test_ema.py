"""EMA of the trainable weights with diffusers EMAModel's decay warm-up."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from fewstep.train.ema import EMA


def _live(value: float) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    nn.init.constant_(layer.weight, value)
    return layer


def test_warmup_matches_diffusers_ema_model():
    """The same weight sequence through fewstep's EMA and diffusers' EMAModel (default settings) gives the same
    shadow at every step; decay 0.999 would otherwise keep ~45% of the start after 800 updates."""
    layer = _live(0.0)
    ours = EMA({"student": layer}, decay=0.999)
    theirs = EMAModel(layer.parameters(), decay=0.999)
    for step in range(1, 60):
        nn.init.constant_(layer.weight, float(step))
        ours.update("student")
        theirs.step(layer.parameters())
        assert torch.allclose(ours.shadow["student"]["weight"], theirs.shadow_params[0], atol=1e-4), step
    assert ours.updates == {"student": 59}
    assert ours.decay_of_next_update("student") == pytest.approx(60 / 69)


def test_without_warmup_the_decay_is_constant():
    layer = _live(0.0)
    ema = EMA({"student": layer}, decay=0.9, warmup=False)
    nn.init.constant_(layer.weight, 1.0)
    ema.update("student")
    assert torch.allclose(ema.shadow["student"]["weight"], torch.full((1, 2), 0.1))


def test_update_counts_load_with_the_shadows():
    layer = _live(1.0)
    ema = EMA({"student": layer}, decay=0.99)
    ema.update("student")
    ema.update("student")
    other = EMA({"student": _live(0.0)}, decay=0.99)
    other.load_state_dict(ema.state_dict(), dict(ema.updates))
    assert other.updates == {"student": 2} and torch.equal(other.shadow["student"]["weight"], layer.weight)
    other.load_state_dict(ema.state_dict())  # a checkpoint without counts: the warm-up is over
    assert other.decay_of_next_update("student") == 0.99
