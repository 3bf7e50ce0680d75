"""Teacher sampling reproduces each diffusers pipeline's own output (same seed, steps, guidance).

Measured on the tiny zoo (2 prompts, 5 seeds, 4 steps, guidance 3; latents of max |x| ≈ 13-18 for VP because a random
UNet does not predict the noise, ≈ 3-5 for flow): max |Δ| SD1.5+DDIM 2.9e-6, SDXL+DDIM 3.8e-6, SDXL+Euler 9.5e-6,
SD3 1.1e-6, Flux 7.2e-7, i.e. a few float32 ulps of the latents.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.models.backbones import latent_shape, num_tokens, unpack_latents
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.solvers.grids import scheduler_taus, vp_input_scale

PROMPTS = ["a photo of a cat", "a red car"]
STEPS = 4


def _teacher(family: str, guidance_scale: float):
    cfg = SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32", guidance_scale=guidance_scale,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _pipeline_vs_teacher(teacher, seed: int, steps: int = STEPS, guidance: float = 3.0) -> tuple[torch.Tensor, ...]:
    """(teacher latents, pipeline latents), both unpacked ``[b, c, h, w]``."""
    pipe = teacher.pipeline
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    resolution = h * pipe.vae_scale_factor
    kwargs = {"max_sequence_length": 32} if teacher.family in ("sd3", "flux") else {}
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(seed), **kwargs).images  # fmt: skip
    noise = pipe.prepare_latents(
        b, c, resolution, resolution, torch.float32, "cpu", torch.Generator().manual_seed(seed)
    )
    if teacher.family == "flux":  # packed tokens in and out
        noise, out = unpack_latents(noise[0], h, w), unpack_latents(out, h, w)
    noise = noise * vp_input_scale(pipe.scheduler, steps)  # Euler pipelines start at init_noise_sigma
    cond, uncond = encode_prompts(teacher, PROMPTS, **kwargs)
    taus = scheduler_taus(
        pipe.scheduler, teacher.schedule, steps, num_tokens=num_tokens(teacher.denoiser, (b, c, h, w))
    )
    return teacher.sample(noise, cond, taus, uncond), out


@pytest.mark.parametrize("seed", [0, 1])
def test_sd15_ddim_parity(seed):
    teacher = _teacher("sd15", 3.0)
    x, ref = _pipeline_vs_teacher(teacher, seed)
    assert (x - ref).abs().max() < 1e-5
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"


def test_sd15_ddim_trailing_parity():
    teacher = _teacher("sd15", 3.0)
    pipe = teacher.pipeline
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    assert scheduler_taus(pipe.scheduler, teacher.schedule, 2).tolist() == [1.0, 0.5, 0.0]
    x, ref = _pipeline_vs_teacher(teacher, 0, steps=2)
    assert (x - ref).abs().max() < 1e-5


def test_sdxl_ddim_parity():
    teacher = _teacher("sdxl", 3.0)
    pipe = teacher.pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    x, ref = _pipeline_vs_teacher(teacher, 0)
    assert (x - ref).abs().max() < 1e-5


def test_sdxl_default_euler_parity():
    # Euler in σ = √((1-ᾱ)/ᾱ) is DDIM in the VP variable; the arithmetic differs, so rounding is a few ulps of
    # latents of size ~15 (measured max 9.5e-6 over 5 seeds): atol 1e-5 plus a 1e-6 relative part.
    teacher = _teacher("sdxl", 3.0)
    x, ref = _pipeline_vs_teacher(teacher, 0)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_sd3_flow_parity(seed):
    teacher = _teacher("sd3", 3.0)
    x, ref = _pipeline_vs_teacher(teacher, seed)
    assert (x - ref).abs().max() < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_flux_parity_with_guidance_embedding(seed):
    teacher = _teacher("flux", 3.0)  # guidance-distilled: 3.0 goes into the guidance embedding
    assert teacher.guidance_scale == 1.0
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance=3.0)
    assert (x - ref).abs().max() < 1e-5
    _, other = _pipeline_vs_teacher(teacher, seed, guidance=1.0)
    assert (other - ref).abs().max() > 1e-4, "the pipeline's guidance must matter for the comparison to mean much"


# ---------------------------------------------------------------------------------------------------------------------
# τ grids
# ---------------------------------------------------------------------------------------------------------------------


def _sd_ddim(**kw) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, **kw)


def test_ddim_grids():
    leading = _sd_ddim(set_alpha_to_one=False, steps_offset=1)
    vp = VPSchedule.from_diffusers(leading)
    taus = scheduler_taus(leading, vp, 4)
    assert taus.tolist() == pytest.approx([0.752, 0.502, 0.252, 0.002, 0.001])  # t = 751, 501, 251, 1, then ᾱ_0
    assert leading.num_inference_steps is None, "the caller's scheduler must not be modified"
    trailing = _sd_ddim(timestep_spacing="trailing")
    assert scheduler_taus(trailing, VPSchedule.from_diffusers(trailing), 4).tolist() == pytest.approx(
        [1.0, 0.75, 0.5, 0.25, 0.0]
    )
    with pytest.raises(ValueError, match="not the next timestep"):
        scheduler_taus(trailing, vp, 3)  # 999 → 666 → 333, but the timesteps are 999, 666, 332
    assert scheduler_taus(trailing, vp, 3, strict=False).tolist() == pytest.approx([1.0, 0.667, 0.333, 0.0])
    with pytest.raises(ValueError, match="VP scheduler but the schedule is FlowSchedule"):
        scheduler_taus(trailing, FlowSchedule(), 4)


def test_flow_grids():
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(4)
    assert torch.equal(scheduler_taus(sd3, FlowSchedule.from_diffusers(sd3), 4), ref.sigmas)
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = FlowSchedule.from_diffusers(flux, timestep_scale=1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        scheduler_taus(flux, schedule, 4)
    taus = scheduler_taus(flux, schedule, 4, num_tokens=1024)
    s = torch.tensor(np.linspace(1.0, 0.25, 4), dtype=torch.float32)  # FluxPipeline's sigmas, then shifted by e^μ
    expected = torch.cat([schedule.shift(s, num_tokens=1024), torch.zeros(1)])
    torch.testing.assert_close(taus, expected, atol=1e-6, rtol=0)
