"""``fewstep plan`` on the Chroma recipes: the example forward feeds the Chroma transformer what training feeds it (T5
tokens with their mask, no pooled text or guidance input) through fewstep's own adapter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fewstep.cli.main import main
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.plan.inputs import TrainingShape, backbone_forward, default_text_tokens


@pytest.mark.parametrize("recipe", ["dmd/chroma_dmd2_lora", "consistency/chroma_rcm_lora"])
def test_plan_runs_on_the_chroma_recipes(recipe, capsys):
    status = main(["plan", recipe, "teacher.pretrained=tiny:chroma", "--json"])
    assert status == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recommended"] and plan["layouts"]


def test_example_forward_takes_the_masked_t5_tokens():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:chroma"))
    backbone = teacher.denoiser.backbone
    assert default_text_tokens(backbone) == 512  # ChromaPipeline pads T5 to 512
    out = backbone_forward(backbone, teacher, TrainingShape(batch=2, resolution=16, text_tokens=8), device="cpu")()
    assert tuple(out.shape) == latent_shape(teacher, 2, 16) == (2, 4, 8, 8)
