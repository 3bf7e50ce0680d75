"""CogVideoX text-to-video: fewstep's teacher (DDIM on CogVideoX's SNR-shifted, zero-terminal-SNR VP schedule,
v-prediction, the pipeline's CFG) reproduces ``CogVideoXPipeline``'s own latents (``output_type="latent"``, which the
pipeline lays out as ``[b, f, c, h, w]``) for the same noise, steps and guidance, frame by frame; with 5b's 3-D
rotary embeddings (the tiny model's) at its trained size and at another one (the crop region of the rotary grid), and
with 2b's sin-cos positions. Shape rules, prompt encoding and the VAE decode follow the pipeline.

Measured on the tiny zoo (2 prompts, 4 steps, guidance 6, latents ``[2, 4, 3, 4, 4]`` of max |x| ≈ 2.7-3.2): max |Δ|
2.3e-6 to 2.9e-6 (the scheduler combines float32 latents with float64 coefficients, fewstep with float32 ones).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

from fewstep.models.backbones import (
    COGVIDEOX_LAYOUT,
    latent_shape,
    num_tokens,
    pixel_multiple,
    video_latent_shape,
)
from fewstep.models.families import cogvideox_family, detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents
from fewstep.noise.schedules import VPSchedule
from fewstep.solvers.grids import scheduler_taus

PROMPTS = ["a cat", "a red car"]  # within the tiny transformer's 16 text tokens
STEPS = 4  # divides 1000: CogVideoX's DDIM steps from t to t − 1000 // steps, the next trailing timestep
GUIDANCE = 6.0  # CogVideoXPipeline's default


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:cogvideox", guidance_scale=GUIDANCE))


def pipeline_latents(pipe, noise, steps: int = STEPS, guidance: float = GUIDANCE, **kwargs) -> torch.Tensor:
    """``CogVideoXPipeline``'s latents from fewstep's ``noise`` ``[b, c, f, h, w]``, back in fewstep's layout."""
    _, _, f, h, w = noise.shape
    size = {"num_frames": 4 * (f - 1) + 1, "height": 8 * h, "width": 8 * w}
    tokens = pipe.transformer.config.max_text_seq_length  # the pipeline's default is the real model's 226
    out = pipe(latents=noise.permute(COGVIDEOX_LAYOUT), num_inference_steps=steps, guidance_scale=guidance,
               output_type="latent", max_sequence_length=tokens, **size, **kwargs).frames  # fmt: skip
    return out.permute(COGVIDEOX_LAYOUT)


def _pipeline_vs_teacher(teacher, seed: int, guidance: float = GUIDANCE, resolution=None, negatives=None):
    """(teacher latents, pipeline latents), both ``[b, c, f, h, w]``."""
    noise = torch.randn(latent_shape(teacher, len(PROMPTS), resolution), generator=torch.Generator().manual_seed(seed))
    ref = pipeline_latents(teacher.pipeline, noise, guidance=guidance, prompt=PROMPTS, negative_prompt=negatives)
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives)
    taus = scheduler_taus(teacher.pipeline.scheduler, teacher.schedule, STEPS)
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), ref


def _assert_frame_by_frame(x: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    print(f"{label}: max |teacher − pipeline| = {(x - ref).abs().max():.2e}, max |x| = {ref.abs().max():.2f}")
    assert x.shape == ref.shape and ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    for frame in range(x.shape[2]):
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"{label}: latent frame {frame}"


def test_family_schedule_and_shapes(teacher):
    pipe = teacher.pipeline
    assert teacher.family == "cogvideox" == detect_family(pipe) and teacher.denoiser.adapter_name == "cogvideox"
    assert teacher.denoiser.prediction_type == "v_prediction" and isinstance(teacher.schedule, VPSchedule)
    theirs = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod  # SNR shift 3, zero terminal SNR
    assert torch.equal(teacher.schedule.alphas_cumprod, theirs.double())
    plain = VPSchedule.from_diffusers({k: v for k, v in pipe.scheduler.config.items() if k != "snr_shift_scale"})
    assert (plain.alphas_cumprod - theirs).abs().max() > 0.05, "the SNR shift must change the schedule"
    assert float(teacher.schedule.alpha(torch.ones(1))) == 0.0  # zero terminal SNR: pure noise at τ = 1
    assert latent_shape(teacher, 2) == (2, 4, 3, 4, 4)  # 9 frames of 32×32 pixels
    assert latent_shape(teacher, 1, (32, 64), num_frames=5) == (1, 4, 2, 4, 8)
    assert num_tokens(teacher.denoiser, (1, 4, 3, 4, 4)) is None  # a VP schedule reads no token count
    assert pixel_multiple(teacher) == 16  # 8× VAE, 2×2 patches
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        latent_shape(teacher, 1, num_frames=8)
    config = SimpleNamespace(sample_frames=49, sample_height=60, sample_width=90, in_channels=16, out_channels=16)
    backbone = type("CogVideoXTransformer3DModel", (), {"config": config})()  # CogVideoX-2b's and 5b's config
    real = SimpleNamespace(vae_scale_factor_temporal=4, vae_scale_factor_spatial=8, transformer=backbone)
    assert video_latent_shape(real, 1) == (1, 16, 13, 60, 90)  # CogVideoX's defaults: 49 × 480 × 720


def test_image_to_video_and_cogvideox_15_are_refused_by_name(teacher):
    config = dict(teacher.pipeline.transformer.config)
    with pytest.raises(ValueError, match="image-to-video"):
        cogvideox_family(SimpleNamespace(**{**config, "in_channels": 8}))
    with pytest.raises(ValueError, match="CogVideoX 1.5"):
        cogvideox_family(SimpleNamespace(**{**config, "patch_size_t": 2}))


def test_prompt_encoding_is_the_pipelines(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS)
    pe, npe = teacher.pipeline.encode_prompt(PROMPTS, max_sequence_length=16)
    assert cond.prompt_embeds.shape == (2, 16, 32)  # padded to the transformer's max_text_seq_length
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(uncond.prompt_embeds, npe)
    assert cond.prompt_embeds_mask is None  # the pipeline passes no mask


@pytest.mark.parametrize("seed", [0, 1])
def test_cogvideox_parity_frame_by_frame(teacher, seed):
    x, ref = _pipeline_vs_teacher(teacher, seed)
    _assert_frame_by_frame(x, ref, f"seed {seed}")


def test_parity_off_the_trained_grid_and_with_a_negative_prompt(teacher):
    x, ref = _pipeline_vs_teacher(teacher, 2, resolution=(32, 64), negatives=["blurry", "dark"])
    assert x.shape == (2, 4, 3, 4, 8)  # 2 × 4 tokens per frame, cropped from the 2 × 2 rotary grid it was trained on
    _assert_frame_by_frame(x, ref, "32×64")
    unguided, _ = _pipeline_vs_teacher(teacher, 2, guidance=1.0, resolution=(32, 64))
    assert (unguided - ref).abs().max() > 1e-3, "guidance must change the output for the comparison to mean much"


def test_parity_with_2b_sincos_positions(teacher):
    pipe = teacher.pipeline
    rotary = pipe.transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sincos = CogVideoXTransformer3DModel.from_config({**rotary.config, "use_rotary_positional_embeddings": False})
    load = SimpleNamespace(pretrained="tiny:cogvideox", guidance_scale=GUIDANCE)
    two_b = load_teacher(load)
    two_b.pipeline.transformer = sincos.eval().requires_grad_(False)
    two_b.denoiser.backbone = two_b.pipeline.transformer
    assert two_b.pipeline.transformer.patch_embed.use_positional_embeddings
    x, ref = _pipeline_vs_teacher(two_b, 3)
    _assert_frame_by_frame(x, ref, "2b sin-cos")


def test_a_step_count_that_does_not_divide_1000_is_refused(teacher):
    # trailing 3 steps are 999, 666, 332, but CogVideoX's DDIM steps 666 → 333: no τ grid is the pipeline's
    with pytest.raises(ValueError, match="not the next timestep"):
        scheduler_taus(teacher.pipeline.scheduler, teacher.schedule, 3)


def test_vae_decode_is_the_pipelines(teacher):
    pipe = teacher.pipeline
    latents = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    video = decode_latents(teacher, latents)  # [1, 3, 9, 32, 32] in [0, 1]
    assert video.shape == (1, 3, 9, 32, 32)
    ref = pipe.decode_latents(latents.permute(COGVIDEOX_LAYOUT))  # divides by the VAE's scaling factor (5b: 0.7)
    torch.testing.assert_close(video, ((ref + 1) / 2).clamp(0, 1), atol=5e-6, rtol=0)
