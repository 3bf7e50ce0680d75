"""scikit-learn's handwritten digits as a tiny real image dataset: 1,797 8×8 images, 10 classes.

Pixels 0..16 are mapped to [-1, 1]; a fixed 90/10 train/test split is drawn from ``seed``. Always available offline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

NUM_CLASSES = 10
TEST_FRACTION = 0.1
SPLITS = ("train", "test")


class DigitsDataset(Dataset):
    """``(x [1, 8, 8] float32 in [-1, 1], label int)`` items of one split.

    Args:
        split: ``"train"`` (90 %) or ``"test"`` (10 %).
        seed: the permutation that draws the split; the same seed gives the same split everywhere.
    """

    def __init__(self, split: str = "train", seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"DigitsDataset split {split!r} is not one of {', '.join(SPLITS)}.")
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.RandomState(seed).permutation(len(digits.images))
        num_test = round(TEST_FRACTION * len(order))
        idx = order[:num_test] if split == "test" else order[num_test:]
        self.indices: Tensor = torch.from_numpy(idx)  # rows of sklearn's load_digits() in this split
        images = torch.from_numpy(digits.images[idx].astype(np.float32))  # [n, 8, 8], 0..16
        self.images: Tensor = (images / 16.0 * 2.0 - 1.0).unsqueeze(1)  # [n, 1, 8, 8] in [-1, 1]
        self.labels: Tensor = torch.from_numpy(digits.target[idx].astype(np.int64))  # [n]
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def digits_images(split: str = "train") -> tuple[Tensor, Tensor]:
    """All images of a digits split as ``([n, 1, 8, 8] in [0, 1], labels [n])`` (the range of decoded samples)."""
    dataset = DigitsDataset(split=split)
    return (dataset.images + 1) / 2, dataset.labels.clone()
