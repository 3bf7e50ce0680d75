"""Wan 2.1 text-to-video: fewstep's teacher (Euler flow with the pipeline's CFG) reproduces ``WanPipeline``'s own
latents for the same seed, steps and guidance, frame by frame; the shape rules, prompt encoding and the VAE round trip
of video latents follow the pipeline.

Measured on the tiny zoo (2 prompts, 5 seeds, 4 steps, guidance 5, latents ``[2, 16, 2, 4, 4]`` of max |x| ≈ 3.5-4.6):
max |Δ| 1.7e-6 to 1.9e-6, a few float32 ulps (the pipeline runs the two CFG branches as two forwards, fewstep as one).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from fewstep.models.backbones import latent_shape, num_tokens, pixel_multiple, video_latent_shape
from fewstep.models.families import schedule_and_prediction
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import FlowSchedule
from fewstep.solvers.grids import scheduler_taus

PROMPTS = ["a cat walking on grass", "a red car at night"]
STEPS = 4
MAX_TOKENS = 32  # UMT5 tokens: the default 512 only pads with zeros


@pytest.fixture(scope="module")
def teacher():
    cfg = SimpleNamespace(pretrained="tiny:wan21", family="auto", dtype="float32", guidance_scale=5.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _pipeline_vs_teacher(teacher, seed: int, guidance: float, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = teacher.pipeline
    b, c, f, h, w = latent_shape(teacher, len(PROMPTS))
    frames, height, width = 4 * (f - 1) + 1, h * 8, w * 8
    out = pipe(prompt=PROMPTS, negative_prompt=negatives, height=height, width=width, num_frames=frames,
               num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent",
               max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(seed)).frames  # fmt: skip
    noise = pipe.prepare_latents(b, c, height, width, frames, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives, max_sequence_length=MAX_TOKENS)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, num_tokens=num_tokens(teacher.denoiser, noise.shape))
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), out


def test_family_schedule_and_shapes(teacher):
    assert teacher.family == "wan21" and teacher.denoiser.adapter_name == "wan"
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.schedule.shift_factor == 3.0
    assert teacher.schedule.timestep_scale == 1000.0
    assert latent_shape(teacher, 2) == (2, 16, 2, 4, 4)  # 5 frames of 32×32 pixels
    assert latent_shape(teacher, 1, 64, num_frames=9) == (1, 16, 3, 8, 8)
    assert num_tokens(teacher.denoiser, (1, 16, 3, 8, 8)) == 3 * 4 * 4  # patch (1, 2, 2)
    assert pixel_multiple(teacher) == 16
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        latent_shape(teacher, 1, num_frames=6)
    backbone = teacher.pipeline.transformer
    real = SimpleNamespace(vae_scale_factor_temporal=4, vae_scale_factor_spatial=8, transformer=backbone)
    assert video_latent_shape(real, 1) == (1, 16, 21, 60, 104)  # WanPipeline's defaults: 81 × 480 × 832


def test_unipc_flow_scheduler_is_a_flow_schedule():
    # The Wan Hub repositories ship UniPC in flow mode: the teacher's schedule is flow with shift = flow_shift.
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    schedule, prediction = schedule_and_prediction(unipc, "wan21")
    assert prediction == "flow" and schedule.shift_factor == 3.0 and schedule.timestep_scale == 1000.0


@pytest.mark.parametrize("seed", [0, 1])
def test_wan21_flow_parity_frame_by_frame(teacher, seed):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance=5.0)
    assert x.shape == ref.shape == (2, 16, 2, 4, 4)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    for frame in range(x.shape[2]):
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"


def test_wan21_parity_with_negative_prompt_and_guidance_matters(teacher):
    negatives = ["blurry, static", "low quality"]
    x, ref = _pipeline_vs_teacher(teacher, 0, guidance=4.0, negatives=negatives)
    assert (x - ref).abs().max() < 1e-5
    unguided, _ = _pipeline_vs_teacher(teacher, 0, guidance=1.0)
    assert (unguided - ref).abs().max() > 1e-3, "guidance must change the output for the comparison to mean much"


def test_wan21_video_vae_round_trip_matches_the_pipeline(teacher):
    pipe = teacher.pipeline
    latents = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    video = decode_latents(teacher, latents)  # [1, 3, 5, 32, 32] in [0, 1]
    assert video.shape == (1, 3, 5, 32, 32)
    cond, _ = encode_prompts(teacher, PROMPTS[:1], max_sequence_length=MAX_TOKENS)
    ref = pipe.vae.decode(  # WanPipeline's own de-normalisation before decoding
        latents / (1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1))
        + torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1),
        return_dict=False,
    )[0]
    torch.testing.assert_close(video, ((ref + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    encoded = encode_images(teacher, video * 2 - 1)
    assert encoded.shape == latents.shape and cond.prompt_embeds.shape == (1, MAX_TOKENS, 32)
    mean = pipe.vae.encode(video * 2 - 1).latent_dist.mean
    expected = (mean - torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)) / torch.tensor(
        pipe.vae.config.latents_std
    ).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Wan 2.2: two experts switched at boundary_ratio
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher22():
    cfg = SimpleNamespace(pretrained="tiny:wan22", family="auto", dtype="float32", guidance_scale=4.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def test_wan22_experts_switch_at_the_boundary(teacher22):
    from fewstep.models.backbones import WanExperts

    experts = teacher22.denoiser.backbone
    assert teacher22.family == "wan22" and isinstance(experts, WanExperts)
    assert experts.high is teacher22.pipeline.transformer and experts.low is teacher22.pipeline.transformer_2
    assert experts.boundary_timestep == 875.0 and teacher22.schedule.shift_factor == 12.0
    scheduler = teacher22.pipeline.scheduler
    scheduler.set_timesteps(STEPS)
    high = (scheduler.timesteps >= 875).tolist()
    assert True in high and False in high, "the 4-step grid must use both experts for the parity test to cover both"
    # A batch on both sides of the boundary: each sample is denoised by its own expert.
    x = torch.randn(latent_shape(teacher22, 2), generator=torch.Generator().manual_seed(0))
    cond, _ = encode_prompts(teacher22, PROMPTS, max_sequence_length=MAX_TOKENS)
    tau = torch.tensor([0.95, 0.5])
    mixed = teacher22.denoiser.raw(x, tau, cond)
    for i, expert in enumerate((experts.high, experts.low)):
        alone = expert(hidden_states=x[i : i + 1], timestep=1000 * tau[i : i + 1], return_dict=False,
                       encoder_hidden_states=cond.prompt_embeds[i : i + 1])[0]  # fmt: skip
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-6, rtol=0)
    other = experts.low(hidden_states=x[:1], timestep=1000 * tau[:1], encoder_hidden_states=cond.prompt_embeds[:1],
                        return_dict=False)[0]  # fmt: skip
    assert (other - mixed[:1]).abs().max() > 1e-3, "the two experts must differ"


@pytest.mark.parametrize("seed", [0, 1])
def test_wan22_flow_parity_across_the_expert_switch(teacher22, seed):
    x, ref = _pipeline_vs_teacher(teacher22, seed, guidance=4.0)
    assert ref.abs().max() > 1
    for frame in range(x.shape[2]):
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"


def test_wan22_parity_with_a_guidance_scale_per_expert():
    # WanPipeline's guidance_scale (high-noise expert) and guidance_scale_2 (low-noise expert); A14B uses 4 and 3.
    cfg = SimpleNamespace(pretrained="tiny:wan22", family="wan22", dtype="float32", guidance_scale=4.0,
                          guidance_scale_2=2.0, revision=None, variant=None)  # fmt: skip
    teacher = load_teacher(cfg)
    pipe = teacher.pipeline
    b, c, f, h, w = latent_shape(teacher, len(PROMPTS))
    size = dict(height=h * 8, width=w * 8, num_frames=4 * (f - 1) + 1)
    ref = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, guidance_scale_2=2.0,
               output_type="latent", max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(0),
               **size).frames  # fmt: skip
    noise = pipe.prepare_latents(b, c, *size.values(), torch.float32, "cpu", torch.Generator().manual_seed(0))
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS)
    x = teacher.sample(noise, cond, taus, uncond)  # no guidance_scale passed: the teacher's per-expert default
    assert (x - ref).abs().max() < 1e-5
    same = teacher.sample(noise, cond, taus, uncond, guidance_scale=4.0)  # one scale for both experts
    assert (same - ref).abs().max() > 1e-3, "the low-noise expert's guidance must matter for the check to mean much"
