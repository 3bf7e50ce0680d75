"""FLUX.2 [dev]: the teacher sampler reproduces ``Flux2Pipeline`` on the tiny ``flux2`` model (embedded guidance,
FLUX.2's step-dependent shift), prompts are the pipeline's stacked Mistral hidden states, and decoding undoes the
pipeline's batch-norm normalisation and 2×2 patchify."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.models.backbones import latent_shape, num_tokens
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import flux2_empirical_mu
from fewstep.solvers.grids import scheduler_taus, teacher_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

PROMPTS = ["a photo of a cat", "a red car parked on a long empty road at dusk"]
STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:flux2", guidance_scale=4.0))


def _pipeline_vs_teacher(teacher, seed: int, guidance: float, steps: int = STEPS) -> tuple[torch.Tensor, ...]:
    """(teacher latents, pipeline latents), both ``[b, c, h, w]`` (the pipeline's patchified layout)."""
    pipe = teacher.pipeline
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    side = 2 * h * pipe.vae_scale_factor
    noise, ids = pipe.prepare_latents(b, c // 4, side, side, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    unpacked = pipe._unpack_latents_with_ids
    noise, out = unpacked(noise, ids), unpacked(out, ids)
    cond, uncond = encode_prompts(teacher, PROMPTS, guidance=guidance)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, steps, num_tokens=num_tokens(teacher.denoiser, noise.shape))
    return teacher.sample(noise, cond, taus, uncond), out


def test_flux2_family_and_embedded_guidance(teacher):
    assert detect_family(teacher.pipeline) == "flux2" and teacher.family == "flux2"
    assert teacher.guidance_scale == 1.0, "FLUX.2 [dev] embeds its guidance: no second (CFG) forward"
    assert float(teacher.null_cond.guidance) == 4.0
    assert latent_shape(teacher, 2) == (2, 16, 4, 4)  # 16×16 pixels: 8×8 VAE latents of 4 channels, patchified 2×2


def test_flux2_prompts_are_the_stacked_text_encoder_layers(teacher):
    pipe = teacher.pipeline
    cond, uncond = encode_prompts(teacher, PROMPTS)
    assert cond.prompt_embeds.shape == (2, 512, 48) == uncond.prompt_embeds.shape  # padded to 512, 3 layers × 16
    ids = pipe.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
          {"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}]],
        tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", max_length=512,
    )  # fmt: skip
    states = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    assert len(states) == 33, "32 layers: 10, 20 and 30 are intermediate, as in Mistral Small 3.1"
    expected = torch.cat([states[10], states[20], states[30]], dim=-1)[0]  # [512, 48]: layers side by side
    assert (cond.prompt_embeds[0] - expected).abs().max() < 1e-6
    assert torch.equal(cond.guidance, torch.full((2,), 4.0))


def test_flux2_mu_reads_the_step_count(teacher):
    schedule = teacher.schedule
    assert schedule.empirical_mu and schedule.mu(16, 4) != schedule.mu(16, 28)
    assert schedule.mu(16) == flux2_empirical_mu(16, 50)  # given sigmas= alone the pipeline uses its 50 steps
    assert flux2_empirical_mu(5000, 4) == flux2_empirical_mu(5000, 50)  # above 4300 tokens: the 200-step fit
    grid = scheduler_taus(teacher.pipeline.scheduler, schedule, STEPS, num_tokens=16)
    assert (teacher_taus(schedule, STEPS, 16) - grid).abs().max() < 1e-6


@pytest.mark.parametrize(("seed", "guidance"), [(0, 4.0), (1, 4.0), (0, 1.0)])
def test_flux2_teacher_reproduces_the_pipeline(teacher, seed, guidance):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    assert (x - ref).abs().max() < 1e-5


def test_flux2_guidance_matters(teacher):
    _, ref = _pipeline_vs_teacher(teacher, 0, 4.0)
    _, other = _pipeline_vs_teacher(teacher, 0, 1.0)
    assert (other - ref).abs().max() > 1e-3, "the embedded guidance must change the pipeline's output"


def test_flux2_decode_and_encode_match_the_pipeline(teacher):
    pipe = teacher.pipeline
    generator = torch.Generator().manual_seed(0)
    latents = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="latent", generator=generator).images
    images = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    _, c, h, w = latent_shape(teacher, 1)
    ids = pipe._prepare_latent_ids(torch.zeros(1, c, h, w))
    x0 = pipe._unpack_latents_with_ids(latents, ids)
    ours = decode_latents(teacher, x0)
    assert ours.shape == images.shape == (1, 3, 16, 16)
    assert (ours - images).abs().max() < 1e-5
    pixels = images * 2 - 1
    theirs = pipe._encode_vae_image(pixels, generator=None)  # the pipeline's reference-image encoding (posterior mode)
    assert (encode_images(teacher, pixels) - theirs).abs().max() < 1e-5


def test_flux2_klein_is_named_as_unsupported(teacher):
    klein = SimpleNamespace(transformer=teacher.pipeline.transformer, config={"is_distilled": False})
    with pytest.raises(ValueError, match=r"FLUX.2 \[klein\].*not supported; FLUX.2 \[dev\] \(Flux2Pipeline\) is"):
        detect_family(klein)
