"""Qwen-Image: the teacher sampler reproduces ``QwenImagePipeline`` on the tiny ``qwen_image`` model, with true CFG
(conditional and negative branches, ``true_cfg_scale``, the per-token norm rescale) and without; prompts of different
lengths travel with their masks; the VAE round trip uses the pipeline's latent normalisation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.models.backbones import latent_shape, num_tokens, unpack_latents
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import QWEN_NULL_PROMPT, encode_prompts
from fewstep.models.vae import decode_latents
from fewstep.solvers.grids import scheduler_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at dusk"]  # different token counts
STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:qwen_image", guidance_scale=4.0))


def _pipeline_vs_teacher(teacher, seed: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher latents, pipeline latents), both unpacked ``[b, c, h, w]``."""
    pipe = teacher.pipeline
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    resolution = h * pipe.vae_scale_factor
    cfg = {"negative_prompt": [QWEN_NULL_PROMPT] * b} if guidance > 1 else {}
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, true_cfg_scale=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(seed), **cfg).images  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    noise = pipe.prepare_latents(b, c, resolution, resolution, torch.float32, "cpu", generator)
    noise, out = unpack_latents(noise, h, w), unpack_latents(out, h, w)
    cond, uncond = encode_prompts(teacher, PROMPTS)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, num_tokens=num_tokens(teacher.denoiser, noise.shape))
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), out


def test_qwen_prompts_keep_their_lengths(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS)
    lengths = cond.prompt_embeds_mask.sum(1).tolist()
    assert lengths[0] < lengths[1] == cond.prompt_embeds.shape[1]
    assert cond.prompt_embeds.shape[-1] == teacher.pipeline.transformer.config.joint_attention_dim
    both = Conditioning.cat([uncond, cond])  # the negative " " is shorter: padded with masked zeros
    assert both.prompt_embeds.shape[1] == cond.prompt_embeds.shape[1]
    assert both.prompt_embeds_mask[:2].sum(1).tolist() == uncond.prompt_embeds_mask.sum(1).tolist()


@pytest.mark.parametrize(("seed", "guidance"), [(0, 4.0), (1, 4.0), (0, 1.0)])
def test_qwen_image_teacher_reproduces_the_pipeline(teacher, seed, guidance):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    assert (x - ref).abs().max() < 1e-5


def test_true_cfg_rescale_matters(teacher):
    x, ref = _pipeline_vs_teacher(teacher, 0, 4.0)
    rescale, teacher.cfg_rescale = teacher.cfg_rescale, None
    try:
        plain, _ = _pipeline_vs_teacher(teacher, 0, 4.0)
    finally:
        teacher.cfg_rescale = rescale
    assert (plain - ref).abs().max() > 1e-2, "without the norm rescale the teacher is not the pipeline"


def test_qwen_decode_matches_the_pipeline_images(teacher):
    pipe = teacher.pipeline
    latents = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    images = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    _, _, h, w = latent_shape(teacher, 1)
    ours = decode_latents(teacher, unpack_latents(latents, h, w))
    assert ours.shape == images.shape == (1, 3, 2 * h, 2 * w)
    assert (ours - images).abs().max() < 1e-5
