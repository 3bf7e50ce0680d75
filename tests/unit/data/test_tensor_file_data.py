"""data.source: tensors — clean samples from a safetensors file, for custom teachers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fewstep.config import RecipeError, validate_recipe
from fewstep.config.schema import DataConfig
from fewstep.data.loader import BatchStream
from fewstep.data.tensors import TensorFileDataset
from fewstep.models import Conditioning, Teacher
from fewstep.noise import FlowSchedule
from tests.helpers import Echo


def teacher(null_class: int | None = None) -> Teacher:
    null = Conditioning(class_labels=torch.tensor([null_class])) if null_class is not None else None
    return Teacher.from_module(Echo(), FlowSchedule(timestep_scale=1.0), "flow", null_cond=null)


def test_unconditional_batches_follow_the_file(tmp_path):
    x0 = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    save_file({"x0": x0}, tmp_path / "d.safetensors")
    cfg = DataConfig(source="tensors", path=str(tmp_path / "d.safetensors"), batch_size=4, shuffle=False)
    stream = BatchStream(cfg, teacher())
    first, second, third = next(stream), next(stream), next(stream)
    assert torch.equal(first.x0, x0[:4]) and torch.equal(second.x0, x0[4:8])
    assert torch.equal(third.x0, torch.cat([x0[8:], x0[:2]]))  # the next epoch follows
    assert first.uncond is None and first.cond.class_labels is None


def test_class_labels_give_cond_and_null_uncond(tmp_path):
    x0, labels = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    save_file({"x0": x0, "class_labels": labels}, tmp_path / "d.safetensors")
    cfg = DataConfig(source="tensors", path=str(tmp_path / "d.safetensors"), batch_size=3, shuffle=True)
    stream = BatchStream(cfg, teacher(null_class=3), seed=5)
    batch = next(stream)
    rows = [int((x0 == b).flatten(1).all(1).nonzero()) for b in batch.x0]
    assert torch.equal(batch.cond.class_labels, labels[rows])
    assert torch.equal(batch.uncond.class_labels, torch.tensor([3, 3, 3]))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"y": torch.zeros(3, 2)}, "has no 'x0'"),
        ({"x0": torch.zeros(3)}, r"must be \[n, ...\]"),
        ({"x0": torch.zeros(3, 2), "class_labels": torch.zeros(3)}, "must be an integer tensor"),
        ({"x0": torch.zeros(3, 2), "class_labels": torch.zeros(2, dtype=torch.long)}, "must be an integer tensor"),
        ({"x0": torch.zeros(3, 2), "captions": torch.zeros(3)}, "does not read"),
    ],
)
def test_bad_files_are_named(tmp_path, tensors, message):
    save_file(tensors, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match=message):
        TensorFileDataset(tmp_path / "d.safetensors")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TensorFileDataset(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TensorFileDataset(tmp_path / "bad.safetensors")


def test_recipe_needs_a_path_and_rejects_image_keys():
    base = {"teacher": {"pretrained": "x"}, "objective": {"name": "lcm"}, "output_dir": "r"}
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "data": {"source": "tensors", "resolution": 32}})
    text = str(err.value)
    assert "data.path" in text and "required for source: tensors" in text
    assert "data.resolution" in text and "not used with source: tensors" in text
