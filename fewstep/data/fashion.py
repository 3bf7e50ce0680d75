"""Fashion-MNIST (Xiao et al. 2017) as the real-data benchmark set: 60,000 train + 10,000 test 28×28 grey images of
10 clothing classes, read from the standard idx files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped).

Where the files are looked for, first match wins:

1. an explicit directory (``FashionMNISTDataset(path=...)``, ``data.path`` of ``data.source: fashion_mnist``),
2. the environment variable ``FEWSTEP_FASHION_MNIST``,
3. ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package installs them.

Images stay 28×28 (no padding): the benchmark UNets downsample 28 → 14 → 7, which needs no power of two. Pixels
0..255 map to ``[-1, 1]`` like every fewstep image dataset. Any directory of idx files with these names works (the
original MNIST files have the same names and layout).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

ENV_VAR = "FEWSTEP_FASHION_MNIST"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = 10
IMAGE_SIZE = 28
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = ("train", "test")
FILE_STEMS = {  # split -> (images, labels) file names without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type codes (http://yann.lecun.com/exdb/mnist/): the third magic byte; multi-byte values are big-endian
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzipped when its name ends in ``.gz``) into a numpy array of its stored shape.

    Raises:
        ValueError: if the header is not an idx header or the data does not match its shape.
    """
    path = Path(path)
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an idx file (its first bytes are {data[:4].hex() or 'empty'}).")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{str(path)!r}: the header says shape {shape} ({expected} bytes), the file has {len(data)}.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an idx file (gzipped when the name ends in ``.gz``): tests build tiny data sets."""
    path, array = Path(path), np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {array.dtype}.")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The ``(images, labels)`` idx files of ``split`` in ``directory`` (plain or ``.gz``), or ``None`` if either is
    missing."""
    found = []
    for stem in FILE_STEMS[split]:
        names = (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")
        match = next((directory / n for n in names if (directory / n).is_file()), None)
        if match is None:
            return None
        found.append(match)
    return found[0], found[1]


def fashion_mnist_dir(path: str | Path | None = None, split: str = "train") -> Path:
    """The directory the Fashion-MNIST files of ``split`` are read from: ``path``, else ``$FEWSTEP_FASHION_MNIST``,
    else ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: the chosen directory lacks the split's files; the message names all three places.
    """
    env = os.environ.get(ENV_VAR) or None
    if path is not None:
        chosen, how = Path(path).expanduser(), "the given path (data.path)"
    elif env is not None:
        chosen, how = Path(env).expanduser(), f"${ENV_VAR}"
    else:
        chosen, how = DEFAULT_DIR, "the default directory"
    if chosen.is_dir() and split_files(chosen, split) is not None:
        return chosen
    images, labels = FILE_STEMS[split]
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files not found in {str(chosen)!r} ({how}): expected {images}[.gz] and "
        f"{labels}[.gz]. fewstep looks in (1) an explicit directory (data.path, or path=...), else (2) ${ENV_VAR} "
        f"({'set to ' + repr(env) if env else 'unset'}), else (3) {DEFAULT_DIR}. Fix: `apt-get install "
        f"dataset-fashion-mnist` (Debian/Ubuntu, fills {DEFAULT_DIR}), or point ${ENV_VAR} or data.path at a "
        "directory holding the four standard idx files."
    )


def load_fashion_mnist(split: str = "train", path: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The raw pixels and labels of a split: ``(uint8 [n, 28, 28], int64 [n])``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000, the ``t10k`` files).
        path: a directory with the idx files (default: ``$FEWSTEP_FASHION_MNIST``, then Debian's directory).
    """
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split {split!r} is not one of {', '.join(SPLITS)}.")
    images_file, labels_file = split_files(fashion_mnist_dir(path, split), split)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(images_file)!r}: expected uint8 images [n, h, w], got {images.dtype} {images.shape}.")
    if labels.shape != (len(images),):
        raise ValueError(f"{str(labels_file)!r}: expected {len(images)} labels, got shape {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        got = f"{labels.min()}..{labels.max()}"
        raise ValueError(f"{str(labels_file)!r}: labels must be 0..{NUM_CLASSES - 1}, got {got}.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(pixels: Tensor) -> Tensor:
    """uint8 pixels ``[..., h, w]`` → float32 in ``[-1, 1]``."""
    return pixels.float() / 127.5 - 1.0


class FashionMNISTDataset(Dataset):
    """``(x [1, 28, 28] float32 in [-1, 1], label int)`` items of one Fashion-MNIST split.

    Pixels are kept as uint8 (47 MB for the train split) and converted per item or per ``batch``.

    Args:
        split: ``"train"`` or ``"test"``.
        path: directory of the idx files (default: ``$FEWSTEP_FASHION_MNIST``, then
            ``/usr/share/datasets/fashion-mnist``).
    """

    def __init__(self, split: str = "train", path: str | Path | None = None) -> None:
        pixels, self.labels = load_fashion_mnist(split, path)
        self.pixels: Tensor = pixels.unsqueeze(1)  # [n, 1, h, w] uint8
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return to_model_range(self.pixels[i]), int(self.labels[i])

    def batch(self, idx: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[b, 1, h, w]`` in ``[-1, 1]`` and labels ``[b]`` of the rows ``idx``."""
        index = torch.as_tensor(idx, dtype=torch.long)
        return to_model_range(self.pixels[index]), self.labels[index]


def fashion_images(
    split: str = "test", path: str | Path | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Images of a split as ``([n, 1, 28, 28] float32 in [0, 1], labels [n])`` (the metrics' range); ``limit`` keeps
    the first ``limit`` of them."""
    pixels, labels = load_fashion_mnist(split, path)
    pixels, labels = pixels[:limit], labels[:limit]
    return pixels.unsqueeze(1).float() / 255.0, labels
