"""Stable Diffusion 3.5: the SD3 classes with 3.5's transformer features (RMS-normalised q/k, MMDiT-X dual attention)
are detected as the ``sd35`` family, and the teacher sampler reproduces ``StableDiffusion3Pipeline`` on the tiny
``sd35`` model (same seed, steps and CFG)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import SD3Transformer2DModel

import fewstep
from fewstep.models.backbones import latent_shape, num_tokens
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.solvers.grids import scheduler_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

CONFIGS = Path(fewstep.__file__).parent / "assets" / "configs"
PROMPTS = ["a photo of a cat", "a red car"]


def _transformer_family(repo: str) -> str:
    config = json.loads((CONFIGS / repo / "transformer" / "config.json").read_text())
    with init_empty_weights():
        transformer = SD3Transformer2DModel.from_config(config)
    return detect_family(SimpleNamespace(transformer=transformer))


def test_sd35_checkpoints_are_their_own_family():
    assert _transformer_family("stabilityai--stable-diffusion-3.5-large") == "sd35"
    assert _transformer_family("stabilityai--stable-diffusion-3-medium-diffusers") == "sd3"


@pytest.mark.parametrize("seed", [0, 1])
def test_sd35_teacher_reproduces_the_pipeline(seed):
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd35", guidance_scale=3.0))
    pipe = teacher.pipeline
    assert teacher.family == "sd35" and pipe.transformer.config.qk_norm == "rms_norm"
    assert list(pipe.transformer.config.dual_attention_layers) == [0]
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    resolution = h * pipe.vae_scale_factor
    ref = pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="latent", max_sequence_length=32,
               generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    noise = pipe.prepare_latents(b, c, resolution, resolution, torch.float32, "cpu",
                                 torch.Generator().manual_seed(seed))  # fmt: skip
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=32)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, 4, num_tokens=num_tokens(teacher.denoiser, (b, c, h, w)))
    x = teacher.sample(noise, cond, taus, uncond)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    assert (x - ref).abs().max() < 1e-5
