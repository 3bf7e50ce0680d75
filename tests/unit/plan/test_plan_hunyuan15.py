"""``fewstep plan`` and HunyuanVideo 1.5: the transformer's forward reads the values of its inputs (all-zero vision
tokens mean text-to-video; each sample's real text tokens are gathered by their masks), so it cannot run on the meta
device and the planner says so; on a real device the example forward feeds it both text streams with their masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.cli.main import main
from fewstep.models.loading import load_teacher
from fewstep.plan.inputs import TrainingShape, backbone_forward


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:hunyuan15"))


def test_example_forward_runs_on_a_real_device(teacher):
    backbone = teacher.denoiser.backbone
    shape = TrainingShape(batch=2, resolution=32, text_tokens=16, frames=5)
    out = backbone_forward(backbone, teacher, shape, device="cpu")()
    assert out.shape == (2, 4, 2, 4, 4) and torch.isfinite(out).all()


def test_plan_names_why_the_meta_device_cannot_run_it(teacher, capsys):
    shape = TrainingShape(batch=1, resolution=32, text_tokens=16, frames=5)
    with pytest.raises(ValueError, match="meta device: it tells text-to-video by all-zero vision tokens"):
        backbone_forward(teacher.denoiser.backbone, teacher, shape)
    assert main(["plan", "dmd/hunyuan15_dmd2_lora", "teacher.pretrained=tiny:hunyuan15"]) != 0
    assert "train.max_steps=2" in capsys.readouterr().err
