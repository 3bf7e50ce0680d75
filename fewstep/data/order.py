"""Seeded orders: the permutation of one epoch, and random number generators keyed by several integers.

Every order a data stream draws is a pure function of its keys (the run's seed, the epoch, a shard, a bucket), so a
stream rebuilt at a saved position draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor


def epoch_order(num_items: int, epoch: int, seed: int, shuffle: bool = True) -> Tensor:
    """The index order of one epoch: a permutation seeded by ``(seed, epoch)``, or ``arange`` without shuffling."""
    if not shuffle:
        return torch.arange(num_items)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=gen)


def keyed_random(*keys: int | str) -> random.Random:
    """A Python ``random.Random`` seeded by ``keys`` (e.g. ``(seed, epoch, shard)``): the same keys, the same draws
    on every machine and Python version (a string seed is hashed with SHA-512)."""
    return random.Random("/".join(str(k) for k in keys))
