"""Fashion-MNIST: the idx reader, where the files are looked for, the dataset and ``data.source: fashion_mnist``.

Every test but the last two runs on a tiny idx directory written here, so nothing depends on Debian's package; the
real files are checked when they are installed.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fewstep.config.schema import DataConfig
from fewstep.data.fashion import (
    DEFAULT_DIR,
    ENV_VAR,
    FashionMNISTDataset,
    fashion_images,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from fewstep.data.loader import BatchStream
from fewstep.models import Conditioning, Teacher
from fewstep.noise import FlowSchedule
from tests.helpers import Echo


def tiny_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, 28, 28)).astype(np.uint8)


@pytest.fixture
def tiny_dir(tmp_path):
    """20 train images (gzipped files) and 10 test images (plain files), labels 0..9 cycled."""
    root = tmp_path / "fashion"
    write_idx(root / "train-images-idx3-ubyte.gz", tiny_pixels(20, 0))
    write_idx(root / "train-labels-idx1-ubyte.gz", (np.arange(20) % 10).astype(np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte", tiny_pixels(10, 1))
    write_idx(root / "t10k-labels-idx1-ubyte", (np.arange(10)[::-1] % 10).astype(np.uint8))
    return root


def test_idx_round_trip_and_header_errors(tmp_path):
    pixels = tiny_pixels(3, 0)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", pixels)), pixels)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", pixels)), pixels)
    header = bytes([0, 0, 0x0C, 1]) + np.asarray([2], dtype=">u4").tobytes()  # int32, big-endian
    (tmp_path / "i32").write_bytes(header + np.asarray([7, -1], dtype=">i4").tobytes())
    assert read_idx(tmp_path / "i32").tolist() == [7, -1]
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"header says shape \(3, 28, 28\)"):
        read_idx(tmp_path / "short")


def test_dataset_from_a_directory(tiny_dir):
    train, test = FashionMNISTDataset("train", tiny_dir), FashionMNISTDataset("test", tiny_dir)
    assert (len(train), len(test)) == (20, 10)
    x, label = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and label == 3
    expected = torch.from_numpy(tiny_pixels(20, 0)[3]).float() / 127.5 - 1  # 0 → -1, 255 → 1
    assert torch.allclose(x[0], expected)
    xb, yb = test.batch([0, 9])
    assert xb.shape == (2, 1, 28, 28) and yb.tolist() == [9, 0]
    assert float(xb.min()) >= -1 and float(xb.max()) <= 1
    images, labels = fashion_images("test", tiny_dir, limit=4)
    assert images.shape == (4, 1, 28, 28) and torch.allclose(images, (test.batch(range(4))[0] + 1) / 2)
    assert labels.tolist() == [9, 8, 7, 6]


def test_where_the_files_are_looked_for(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tiny_dir))
    assert fashion_mnist_dir() == tiny_dir and len(FashionMNISTDataset("test")) == 10  # the environment variable
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", empty)  # an explicit directory wins over the variable, and must hold the files
    message = str(err.value)
    assert all(s in message for s in (str(empty), ENV_VAR, str(tiny_dir), str(DEFAULT_DIR), "apt-get install"))
    monkeypatch.setenv(ENV_VAR, str(empty))
    with pytest.raises(FileNotFoundError, match=rf"\${ENV_VAR}"):
        FashionMNISTDataset("test")
    with pytest.raises(ValueError, match="split 'valid' is not one of train, test"):
        FashionMNISTDataset("valid", tiny_dir)


def test_bad_files_are_named(tiny_dir):
    write_idx(tiny_dir / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels must be 0..9, got 12..12"):
        load_fashion_mnist("test", tiny_dir)
    write_idx(tiny_dir / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 10 labels"):
        load_fashion_mnist("test", tiny_dir)


def test_data_config_source():
    assert DataConfig(source="fashion_mnist").path is None
    assert DataConfig(source="fashion_mnist", path="/data/fmnist").path == "/data/fmnist"
    with pytest.raises(ValueError, match="resolution: not used with source: fashion_mnist"):
        DataConfig(source="fashion_mnist", resolution=28)


def test_batch_stream_gives_class_conditional_batches(tiny_dir):
    teacher = Teacher.from_module(
        Echo(), FlowSchedule(timestep_scale=1.0), "flow", null_cond=Conditioning(class_labels=torch.tensor([10]))
    )
    cfg = DataConfig(source="fashion_mnist", path=str(tiny_dir), batch_size=6, shuffle=False)
    stream = BatchStream(cfg, teacher)
    batch = next(stream)
    assert batch.x0.shape == (6, 1, 28, 28) and batch.cond.class_labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.uncond.class_labels.tolist() == [10] * 6
    assert torch.equal(batch.x0, FashionMNISTDataset("train", tiny_dir).batch(range(6))[0])
    assert next(stream).cond.class_labels.tolist() == [6, 7, 8, 9, 0, 1] and stream.position == 12
    assert stream.preview(12).cond.class_labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


real = pytest.mark.skipif(
    not (DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist is not installed"
)


@real
def test_the_real_files():
    train, test = FashionMNISTDataset("train", DEFAULT_DIR), FashionMNISTDataset("test", DEFAULT_DIR)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels (ankle boot, T-shirt, ...)
    assert train.pixels.dtype == torch.uint8 and int(train.pixels.max()) == 255 and int(train.pixels.min()) == 0


@real
def test_gz_and_plain_files_read_the_same(tmp_path):
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.open(DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").read())
    assert np.array_equal(read_idx(plain), read_idx(DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz"))
