"""PixArt-Σ and Sana: detected as their own families; prompts are encoded as their pipelines do (T5 / Gemma 2 tokens
with attention masks, Sana's complex human instruction in front of the prompt only); the teacher sampler reproduces
``PixArtSigmaPipeline`` and ``SanaPipeline`` (same seed, steps and CFG) on the tiny models.

Both pipelines ship a DPM-Solver++ scheduler, which fewstep's teacher sampler (DDIM for VP, Euler for flow) does not
reproduce: the parity runs swap in the scheduler it does, built from the shipped config (PixArt-Σ: ``DDIMScheduler``
with trailing spacing; Sana: ``FlowMatchEulerDiscreteScheduler`` at Sana's ``flow_shift``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.models.backbones import latent_shape
from fewstep.models.conditioning import Conditioning
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.plan.inputs import TrainingShape, backbone_forward
from fewstep.solvers.grids import scheduler_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

PROMPTS = ["a cat", "a red car on a road"]  # different token counts
STEPS = 4
MAX_TOKENS = 32  # short text for speed (the pipelines' default is 300)


@pytest.fixture(scope="module")
def pixart():
    return load_teacher(SimpleNamespace(pretrained="tiny:pixart_sigma", guidance_scale=4.5))


@pytest.fixture(scope="module")
def sana():
    return load_teacher(SimpleNamespace(pretrained="tiny:sana", guidance_scale=4.5))


def _swap_scheduler(teacher) -> None:
    """The scheduler fewstep's sampler reproduces, from the shipped DPM-Solver config."""
    pipe = teacher.pipeline
    if type(pipe.scheduler).__name__ != "DPMSolverMultistepScheduler":
        return  # swapped already (the teachers are shared by the module)
    if teacher.family == "pixart_sigma":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   clip_sample=False)  # fmt: skip
    else:
        shift = pipe.scheduler.config.flow_shift
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _pipeline_vs_teacher(teacher, seed: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher latents, pipeline latents) ``[b, c, h, w]``."""
    pipe = teacher.pipeline
    b, c, h, w = latent_shape(teacher, len(PROMPTS))
    resolution = h * pipe.vae_scale_factor
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, height=resolution,
               width=resolution, output_type="latent", use_resolution_binning=False, max_sequence_length=MAX_TOKENS,
               generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    noise = pipe.prepare_latents(b, c, resolution, resolution, torch.float32, "cpu",
                                 torch.Generator().manual_seed(seed))  # fmt: skip
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS)
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), out


def test_families_schedules_and_learned_sigma(pixart, sana):
    assert detect_family(pixart.pipeline) == "pixart_sigma" and detect_family(sana.pipeline) == "sana"
    assert isinstance(pixart.schedule, VPSchedule) and pixart.denoiser.prediction_type == "epsilon"
    assert isinstance(sana.schedule, FlowSchedule) and sana.denoiser.prediction_type == "flow"
    assert sana.schedule.shift_factor == sana.pipeline.scheduler.config.flow_shift == 3.0
    x = torch.randn(latent_shape(pixart, 2))
    assert pixart.pipeline.transformer.config.out_channels == 2 * x.shape[1]
    cond, _ = encode_prompts(pixart, PROMPTS, max_sequence_length=MAX_TOKENS)
    assert pixart.denoiser.raw(x, torch.full((2,), 0.5), cond).shape == x.shape  # the variance half is dropped


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_prompts_carry_their_masks(family, pixart, sana):
    teacher = {"pixart": pixart, "sana": sana}[family]
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    assert cond.prompt_embeds.shape[:2] == cond.prompt_embeds_mask.shape == (2, MAX_TOKENS)
    lengths = cond.prompt_embeds_mask.sum(1).tolist()
    assert lengths[0] < lengths[1], "each prompt keeps its own length"
    assert uncond.prompt_embeds.shape == cond.prompt_embeds.shape
    assert uncond.prompt_embeds_mask.sum(1).tolist() == [1, 1]  # "": T5's </s>, Gemma's <bos>
    both = Conditioning.cat([uncond, cond])
    assert both.prompt_embeds_mask.shape == (4, MAX_TOKENS)


def test_sana_prompt_follows_the_complex_human_instruction(sana):
    pipe = sana.pipeline
    cond, _ = encode_prompts(sana, PROMPTS[:1], max_sequence_length=MAX_TOKENS)
    bare, *_ = pipe.encode_prompt(PROMPTS[:1], False, max_sequence_length=MAX_TOKENS, complex_human_instruction=None)
    assert cond.prompt_embeds.shape == bare.shape
    assert (cond.prompt_embeds - bare).abs().max() > 1e-3, "the instruction in front changes the prompt's states"


@pytest.mark.parametrize(("family", "seed", "guidance"), [("pixart", 0, 4.5), ("pixart", 1, 1.0), ("sana", 0, 4.5),
                                                         ("sana", 1, 1.0)])  # fmt: skip
def test_teacher_reproduces_the_pipeline(family, seed, guidance, pixart, sana):
    teacher = {"pixart": pixart, "sana": sana}[family]
    _swap_scheduler(teacher)
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance)
    print(f"{teacher.family} seed {seed} w {guidance}: max |teacher − pipeline| = {(x - ref).abs().max():.2e}, "
          f"max |x| = {ref.abs().max():.2f}")  # fmt: skip
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    # float32 rounding of outputs that reach ~700 (PixArt's learned-σ latents): 1e-6 of the largest value
    assert (x - ref).abs().max() < 1e-6 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_vae_round_trip_matches_the_pipeline_decode(family, pixart, sana):
    teacher = {"pixart": pixart, "sana": sana}[family]
    pipe = teacher.pipeline
    latents = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    theirs = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]  # as the pipelines
    ours = decode_latents(teacher, latents)
    assert (ours - ((theirs + 1) / 2).clamp(0, 1)).abs().max() < 1e-6
    again = encode_images(teacher, ours * 2 - 1)
    assert again.shape == latents.shape


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_the_text_mask_matters(family, pixart, sana):
    teacher = {"pixart": pixart, "sana": sana}[family]
    cond, _ = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    x = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(0))
    tau = torch.full((2,), 0.7)
    masked = teacher.denoiser.raw(x, tau, cond)
    unmasked = teacher.denoiser.raw(x, tau, cond.replace(prompt_embeds_mask=torch.ones_like(cond.prompt_embeds_mask)))
    assert (masked - unmasked).abs().max() > 1e-4, "padding tokens must not be attended to"


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_planner_inputs_run_through_the_adapter(family, pixart, sana):
    teacher = {"pixart": pixart, "sana": sana}[family]
    backbone = teacher.denoiser.backbone
    side = latent_shape(teacher, 1)[-1] * teacher.pipeline.vae_scale_factor
    out = backbone_forward(backbone, teacher, TrainingShape(batch=2, resolution=side, text_tokens=300), device="cpu")()
    assert out.shape == latent_shape(teacher, 2)  # ε / velocity only: PixArt's variance half is dropped


def test_pixart_alpha_micro_conditions_and_sana_sprint_are_refused(pixart, sana):
    with init_empty_weights():
        alpha = type(pixart.denoiser.backbone).from_config(
            {**pixart.denoiser.backbone.config, "use_additional_conditions": True}
        )
        sprint = type(sana.denoiser.backbone).from_config({**sana.denoiser.backbone.config, "guidance_embeds": True})
    with pytest.raises(ValueError, match="PixArt-α at 1024 px"):
        detect_family(SimpleNamespace(transformer=alpha))
    with pytest.raises(ValueError, match="Sana Sprint"):
        detect_family(SimpleNamespace(transformer=sprint))


def test_sana_without_its_encoders_keeps_the_dc_ae_scale(sana):
    lean = load_teacher(SimpleNamespace(pretrained="tiny:sana"), encoders=False, null_cond=sana.null_cond)
    assert lean.pipeline.vae is None and lean.pipeline.text_encoder is None
    assert lean.pipeline.vae_scale_factor == sana.pipeline.vae_scale_factor == 4  # read from the DC-AE's config
    assert latent_shape(lean, 1) == latent_shape(sana, 1)
    latents = torch.randn(latent_shape(sana, 1), generator=torch.Generator().manual_seed(0))
    assert (decode_latents(lean, latents) - decode_latents(sana, latents)).abs().max() < 1e-6  # VAE loaded for it
