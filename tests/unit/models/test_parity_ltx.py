"""LTX-Video text-to-video: fewstep's teacher (Euler flow with the pipeline's CFG, on unpacked latents) reproduces
``LTXPipeline``'s own latents (``output_type="latent"``, unpacked) for the same seed, steps and guidance, frame by
frame; packing, the dynamic shift over the video token count, prompt encoding with masks and the VAE round trip
(per-channel statistics, the decode timestep) follow the pipeline.

Measured on the tiny zoo (2 prompts, seeds 0-2, 4 steps, guidance 3, latents ``[2, 8, 2, 2, 2]`` of max |x| ≈ 4.2-5.5):
max |Δ| 7e-7 to 1e-6 (the pipeline runs the two CFG branches as one 2B forward too).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import LTXPipeline

from fewstep.models.backbones import (
    LTX_ROPE_SCALE,
    latent_shape,
    ltx_pack_latents,
    ltx_unpack_latents,
    num_tokens,
    pixel_multiple,
    video_latent_shape,
)
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import FlowSchedule
from fewstep.solvers.grids import scheduler_taus

PROMPTS = ["a cat walking on grass", "a red car at night"]
STEPS = 4
MAX_TOKENS = 32  # T5 tokens: the default 128 only pads (masked)


@pytest.fixture(scope="module")
def teacher():
    cfg = SimpleNamespace(pretrained="tiny:ltx", family="auto", dtype="float32", guidance_scale=3.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _size(teacher) -> dict[str, int]:
    _, _, f, h, w = latent_shape(teacher, 1)
    return dict(num_frames=8 * (f - 1) + 1, height=h * 32, width=w * 32)


def _pipeline_vs_teacher(teacher, seed: int, guidance: float, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = teacher.pipeline
    shape = latent_shape(teacher, len(PROMPTS))
    size = _size(teacher)
    packed = pipe(prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=guidance,
                  output_type="latent", max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(seed),
                  **size).frames  # fmt: skip
    ref = ltx_unpack_latents(packed, *shape[2:])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # LTXPipeline draws unpacked noise
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives, max_sequence_length=MAX_TOKENS)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, num_tokens=num_tokens(teacher.denoiser, shape))
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), ref


def test_family_schedule_shapes_and_packing(teacher):
    pipe = teacher.pipeline
    assert teacher.family == "ltx" == detect_family(pipe) and teacher.denoiser.adapter_name == "ltx"
    schedule = teacher.schedule
    assert isinstance(schedule, FlowSchedule) and schedule.timestep_scale == 1000.0 and schedule.use_dynamic_shifting
    assert (schedule.base_shift, schedule.max_shift, schedule.base_image_seq_len) == (0.95, 2.05, 1024)
    assert latent_shape(teacher, 2) == (2, 8, 2, 2, 2)  # 9 frames of 64×64 pixels
    assert latent_shape(teacher, 1, 128, num_frames=17) == (1, 8, 3, 4, 4)
    assert num_tokens(teacher.denoiser, (1, 8, 3, 4, 4)) == 3 * 4 * 4  # LTXPipeline's video_sequence_length
    assert pixel_multiple(teacher) == 32
    with pytest.raises(ValueError, match="8k \\+ 1 frames"):
        latent_shape(teacher, 1, num_frames=12)
    real = SimpleNamespace(vae_temporal_compression_ratio=8, vae_spatial_compression_ratio=32,
                           transformer=pipe.transformer)  # fmt: skip
    assert video_latent_shape(real, 1) == (1, 8, 21, 16, 22)  # LTXPipeline's defaults: 161 × 512 × 704
    x = torch.randn(2, 8, 2, 4, 6)
    for p, p_t in ((1, 1), (2, 2)):
        packed = ltx_pack_latents(x, p, p_t)
        torch.testing.assert_close(packed, LTXPipeline._pack_latents(x, p, p_t), atol=0, rtol=0)
        assert torch.equal(ltx_unpack_latents(packed, 2 // p_t, 4 // p, 6 // p, p, p_t), x)


def test_prompt_encoding_keeps_the_masks_and_the_rope_scale(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    pe, mask, npe, nmask = teacher.pipeline.encode_prompt(PROMPTS, max_sequence_length=MAX_TOKENS)
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(uncond.prompt_embeds, npe)
    assert torch.equal(cond.prompt_embeds_mask, mask.long()) and torch.equal(uncond.prompt_embeds_mask, nmask.long())
    assert 0 < int(uncond.prompt_embeds_mask.sum()) < int(cond.prompt_embeds_mask.sum()) < 2 * MAX_TOKENS
    assert torch.equal(cond.rope_interpolation_scale, torch.tensor([LTX_ROPE_SCALE] * 2))  # (8 / 25 fps, 32, 32)


@pytest.mark.parametrize("seed", [0, 1])
def test_ltx_flow_parity_frame_by_frame(teacher, seed):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance=3.0)
    assert x.shape == ref.shape == (2, 8, 2, 2, 2)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    for frame in range(x.shape[2]):
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"


def test_ltx_parity_with_negative_prompt_and_guidance_matters(teacher):
    negatives = ["worst quality, blurry", "jittery"]
    x, ref = _pipeline_vs_teacher(teacher, 0, guidance=4.0, negatives=negatives)
    assert (x - ref).abs().max() < 1e-5
    unguided, _ = _pipeline_vs_teacher(teacher, 0, guidance=1.0)
    assert (unguided - ref).abs().max() > 1e-3, "guidance must change the output for the comparison to mean much"


def test_ltx_video_vae_round_trip_matches_the_pipeline(teacher):
    pipe = teacher.pipeline
    vae = pipe.vae
    assert vae.config.timestep_conditioning and not torch.equal(vae.latents_std, torch.ones(8))
    latents = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    video = decode_latents(teacher, latents)  # [1, 3, 9, 64, 64] in [0, 1]
    assert video.shape == (1, 3, 9, 64, 64)
    raw = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    ref = vae.decode(raw, torch.zeros(1), return_dict=False)[0]  # the pipeline's default decode_timestep 0
    torch.testing.assert_close(video, ((ref + 1) / 2).clamp(0, 1), atol=5e-6, rtol=0)  # float32 rounding of the decode
    encoded = encode_images(teacher, video * 2 - 1)
    mean = vae.encode(video * 2 - 1).latent_dist.mean
    expected = LTXPipeline._normalize_latents(mean, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert encoded.shape == latents.shape
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=1e-5)
