"""``DigitsDataset``: sklearn's 1,797 digits in [-1, 1] with a fixed, seeded 90/10 split."""

from __future__ import annotations

import pytest
import torch

from fewstep.data.digits import DigitsDataset


def test_split_sizes_ranges_and_disjointness():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert (len(train), len(test)) == (1617, 180)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert len(set(train.indices.tolist()) | set(test.indices.tolist())) == 1797
    x, label = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(label, int)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))


def test_values_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    test = DigitsDataset("test")
    i = int(test.indices[5])
    expected = torch.from_numpy(digits.images[i]).float() / 8.0 - 1.0  # 0..16 → [-1, 1]
    assert torch.allclose(test[5][0][0], expected) and test[5][1] == int(digits.target[i])


def test_split_is_seeded():
    assert torch.equal(DigitsDataset("test", seed=0).indices, DigitsDataset("test", seed=0).indices)
    assert not torch.equal(DigitsDataset("test", seed=0).indices, DigitsDataset("test", seed=1).indices)
    with pytest.raises(ValueError, match="train, test"):
        DigitsDataset("val")
