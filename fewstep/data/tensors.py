"""``data.source: tensors``: clean samples (and optional class labels) stored in one safetensors file.

The data source for custom teachers (``Teacher.from_module``) whose samples are not images: any tensor shape works.
The file holds ``x0`` ``[n, ...]`` and, for a class-conditional teacher, ``class_labels`` ``[n]`` (int64). Write it
with ``safetensors.torch.save_file({"x0": x0, "class_labels": labels}, path)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

X0_KEY, LABELS_KEY = "x0", "class_labels"


class TensorFileDataset(Dataset):
    """``(x0, label or None)`` items from a safetensors file with ``x0`` and optional ``class_labels``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.path {str(path)!r} does not exist. data.source=tensors needs a safetensors file with an "
                f"{X0_KEY!r} tensor [n, ...] (and optionally {LABELS_KEY!r} [n])."
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"data.path {str(path)!r} is not a readable safetensors file: {err}") from err
        if X0_KEY not in tensors:
            raise ValueError(f"{str(path)!r} has no {X0_KEY!r} tensor (it has {sorted(tensors)}).")
        self.x0: Tensor = tensors[X0_KEY].float()
        self.labels: Tensor | None = tensors.get(LABELS_KEY)
        if self.x0.ndim < 2 or len(self.x0) == 0:
            raise ValueError(f"{str(path)!r}: {X0_KEY!r} must be [n, ...] with n > 0, got {tuple(self.x0.shape)}.")
        if self.labels is not None:
            if self.labels.shape != (len(self.x0),) or self.labels.is_floating_point():
                raise ValueError(
                    f"{str(path)!r}: {LABELS_KEY!r} must be an integer tensor [{len(self.x0)}], got "
                    f"{self.labels.dtype} {tuple(self.labels.shape)}."
                )
            self.labels = self.labels.long()
        unknown = sorted(set(tensors) - {X0_KEY, LABELS_KEY})
        if unknown:
            raise ValueError(f"{str(path)!r} has tensors fewstep does not read: {unknown} (only x0, class_labels).")

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> tuple[Tensor, int | None]:
        return self.x0[i], int(self.labels[i]) if self.labels is not None else None

    def batch(self, idx: list[int]) -> tuple[Tensor, Tensor | None]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.x0[index], self.labels[index] if self.labels is not None else None
