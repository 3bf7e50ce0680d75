"""Chroma: the teacher sampler reproduces ``ChromaPipeline`` on the tiny ``chroma`` model, with true CFG (the
pipeline's ``neg + w·(cond − neg)`` over a negative prompt, ``""`` by default) and without; the T5 masks keep one
padding token, as the pipeline's do, and they change the output; decoding undoes FLUX.1's latent normalisation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.models.backbones import chroma_attention_mask, latent_shape, num_tokens, unpack_latents
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents
from fewstep.solvers.grids import scheduler_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at dusk"]  # different token counts
NEGATIVES = ["blurry", "low quality, ugly, deformed"]
STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:chroma", guidance_scale=5.0))


def _pipeline_vs_teacher(teacher, seed: int, guidance: float, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher latents, pipeline latents), both unpacked ``[b, c, h, w]``."""
    pipe = teacher.pipeline
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    resolution = h * pipe.vae_scale_factor
    out = pipe(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    noise, _ = pipe.prepare_latents(b, c, resolution, resolution, torch.float32, "cpu", generator)
    noise, out = unpack_latents(noise, h, w), unpack_latents(out, h, w)
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, num_tokens=num_tokens(teacher.denoiser, noise.shape))
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), out


def test_chroma_family_and_shapes(teacher):
    assert detect_family(teacher.pipeline) == "chroma" and teacher.family == "chroma"
    assert teacher.guidance_scale == 5.0, "Chroma's guidance is true CFG: a negative branch, no embedded guidance"
    assert latent_shape(teacher, 2) == (2, 4, 8, 8)  # 16×16 pixels: 8×8 latents, packed 2×2 into 16 tokens
    assert num_tokens(teacher.denoiser, (2, 4, 8, 8)) == 16


def test_chroma_masks_keep_one_padding_token(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS)
    tokens = teacher.pipeline.tokenizer(PROMPTS, padding="max_length", max_length=512, return_tensors="pt")
    real = tokens.attention_mask.sum(1)
    assert cond.prompt_embeds.shape == (2, 512, 32) == uncond.prompt_embeds.shape
    assert cond.prompt_embeds_mask.sum(1).tolist() == (real + 1).tolist()  # the first padding token is attended
    assert uncond.prompt_embeds_mask.sum(1).tolist() == [2, 2]  # "": its end token and one padding token
    joint = chroma_attention_mask(cond.prompt_embeds_mask, 16, torch.float32)
    assert joint.shape == (2, 512 + 16) and joint.dtype == torch.float32 and bool((joint[:, 512:] == 1).all())


@pytest.mark.parametrize(("seed", "guidance", "negatives"), [(0, 5.0, None), (1, 5.0, NEGATIVES), (0, 1.0, None)])
def test_chroma_teacher_reproduces_the_pipeline(teacher, seed, guidance, negatives):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance, negatives)
    diff = (x - ref).abs().max().item()
    print(f"chroma teacher, guidance {guidance}, negatives {negatives is not None}: max |ours − pipeline| = {diff:.2e}")
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    assert diff < 1e-5


def test_chroma_guidance_and_negatives_matter(teacher):
    _, ref = _pipeline_vs_teacher(teacher, 0, 5.0)
    _, unguided = _pipeline_vs_teacher(teacher, 0, 1.0)
    _, negated = _pipeline_vs_teacher(teacher, 0, 5.0, NEGATIVES)
    assert (unguided - ref).abs().max() > 1e-3, "true CFG must change the pipeline's output"
    assert (negated - ref).abs().max() > 1e-3, "the negative prompt must change the pipeline's output"


def test_chroma_mask_matters(teacher):
    cond, _ = encode_prompts(teacher, PROMPTS[:1])
    x = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.7])
    masked = teacher.denoiser.raw(x, tau, cond)
    unmasked = teacher.denoiser.raw(x, tau, cond.replace(prompt_embeds_mask=torch.ones_like(cond.prompt_embeds_mask)))
    assert (masked - unmasked).abs().max() > 1e-4, "the T5 padding mask must change the velocity"


def test_chroma_decode_matches_the_pipeline_images(teacher):
    pipe = teacher.pipeline
    latents = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    images = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    _, _, h, w = latent_shape(teacher, 1)
    ours = decode_latents(teacher, unpack_latents(latents, h, w))
    assert ours.shape == images.shape == (1, 3, 2 * h, 2 * w)
    assert (ours - images).abs().max() < 1e-5
