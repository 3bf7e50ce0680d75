"""The class-conditional pixel-video Wan family (``wan_class``): the shipped moving-digits teacher loads, shapes its
clips and feeds the class as a one-hot token, the last entry being CFG's null class."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from fewstep.models import Conditioning
from fewstep.models.backbones import latent_shape, pixel_clip_shape, pixel_multiple
from fewstep.models.loading import load_teacher

SPEC = "fewstep:moving-digits-flow"


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained=SPEC, guidance_scale=2.0))


def test_family_null_class_and_clip_shape(teacher):
    from fewstep.eval.samplers import conditioning_kind

    assert teacher.family == "wan_class" and teacher.denoiser.adapter_name == "wan_class"
    assert teacher.null_cond.class_labels.tolist() == [10]
    assert latent_shape(teacher, 3) == (3, 1, 8, 24, 24)
    assert latent_shape(teacher, 1, resolution=12, num_frames=4) == (1, 1, 4, 12, 12)
    assert pixel_multiple(teacher) == 3  # patches of 3×3 pixels
    assert conditioning_kind(teacher.pipeline) == ("class", 10, 10)


def test_class_reaches_the_transformer_as_a_one_hot_token(teacher):
    x = torch.randn(2, 1, 8, 24, 24, generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.7, 0.4])
    labels = torch.tensor([3, 10])
    with torch.no_grad():
        raw = teacher.denoiser.raw(x, tau, Conditioning(class_labels=labels))
        tokens = torch.nn.functional.one_hot(labels, 11).float()[:, None]
        direct = teacher.denoiser.backbone(x, 1000 * tau, tokens, return_dict=False)[0]
        other = teacher.denoiser.raw(x, tau, Conditioning(class_labels=torch.tensor([4, 10])))
    assert torch.equal(raw, direct)
    assert not torch.allclose(raw[0], other[0]) and torch.equal(raw[1], other[1])


def test_loading_is_quiet_and_an_unrecorded_clip_size_is_refused(caplog):
    with caplog.at_level(logging.WARNING):
        load_teacher(SimpleNamespace(pretrained=SPEC, guidance_scale=1.0))
    assert not [r for r in caplog.records if "Expected types" in r.getMessage()]
    pipe = SimpleNamespace()  # a pixel video pipeline without its training record
    with pytest.raises(ValueError, match="data.num_frames"):
        pixel_clip_shape(pipe, 1)


def test_recipe_clip_size_is_checked_and_becomes_the_default():
    from fewstep.data.video_folder import prepare_video_data

    teacher = load_teacher(SimpleNamespace(pretrained=SPEC, guidance_scale=1.0))
    per_token = teacher.denoiser.backbone.config.patch_size[0]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        prepare_video_data(SimpleNamespace(num_frames=None, resolution=25), teacher)
    if per_token > 1:
        with pytest.raises(ValueError, match="whole tokens"):
            prepare_video_data(SimpleNamespace(num_frames=per_token + 1, resolution=None), teacher)
    prepare_video_data(SimpleNamespace(num_frames=2 * per_token, resolution=12), teacher)
    assert latent_shape(teacher, 1) == (1, 1, 2 * per_token, 12, 12)
