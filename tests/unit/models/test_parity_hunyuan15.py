"""HunyuanVideo 1.5: fewstep's teacher (Euler flow with the pipeline's classifier-free guider) reproduces the latents
of ``HunyuanVideo15Pipeline`` (text-to-video) and ``HunyuanVideo15ImageToVideoPipeline`` for the same seed, steps and
guidance, frame by frame; the prompt encoding (Qwen2.5-VL behind the chat template, ByT5 on quoted text, both with
masks), the first frame's conditioning, the shape rules and the VAE follow the pipelines.

Measured on the tiny zoo (2 prompts, one quoting text for ByT5, 2 seeds, 4 steps, guidance 6, latents
``[2, 4, 2, 4, 4]`` of max |x| ≈ 3.7-4.2): max |Δ| 1.2e-6 to 1.9e-6 per latent frame, 1.1e-6 with negative prompts
at guidance 4 (the pipeline runs the two CFG branches as two forwards, fewstep as one). Image-to-video
(``HunyuanVideo15ImageToVideoPipeline``, one first frame for both prompts): max |Δ| 1.0e-6 to 1.7e-6 per latent frame.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

from fewstep.eval.samplers import teacher_grid
from fewstep.models.backbones import latent_shape, pixel_multiple, video_latent_shape
from fewstep.models.families import detect_family
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import FlowSchedule
from fewstep.solvers.grids import scheduler_taus, teacher_taus

PROMPTS = ["a cat walking on grass", 'a neon sign that reads "OPEN" at night']
STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    cfg = SimpleNamespace(pretrained="tiny:hunyuan15", family="auto", dtype="float32", guidance_scale=6.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _pipeline_vs_teacher(teacher, seed: int, guidance: float, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = teacher.pipeline
    pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance)  # the pipeline's CFG scale lives in its guider
    b, c, f, h, w = latent_shape(teacher, len(PROMPTS))
    frames, height, width = 4 * (f - 1) + 1, h * 8, w * 8
    out = pipe(prompt=PROMPTS, negative_prompt=negatives, height=height, width=width, num_frames=frames,
               num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator().manual_seed(seed)).frames  # fmt: skip
    noise = pipe.prepare_latents(b, c, height, width, frames, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives)
    sigmas = np.linspace(1.0, 0.0, STEPS + 1)[:-1]  # what HunyuanVideo15Pipeline passes its scheduler
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, sigmas=sigmas)
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), out


def test_family_schedule_and_shapes(teacher):
    assert teacher.family == "hunyuan15" and teacher.denoiser.adapter_name == "hunyuan15"
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.schedule.shift_factor == 5.0
    assert teacher.schedule.timestep_scale == 1000.0
    assert latent_shape(teacher, 2) == (2, 4, 2, 4, 4)  # 5 frames of 32×32 pixels
    assert latent_shape(teacher, 1, 64, num_frames=9) == (1, 4, 3, 8, 8)
    assert pixel_multiple(teacher) == 8  # the tiny VAE's 8× (HunyuanVideo 1.5: 16×), patch 1
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        latent_shape(teacher, 1, num_frames=6)
    pipe = teacher.pipeline
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)  # HunyuanVideo 1.5's VAE: 16× in space, 4× in time
    real = SimpleNamespace(vae_scale_factor_temporal=4, vae_scale_factor_spatial=16, transformer=pipe.transformer,
                           video_processor=processor, target_size=640)  # fmt: skip
    assert video_latent_shape(real, 1) == (1, 4, 31, 30, 53)  # 480p: 121 frames at 480 × 848 (16:9 at target 640)
    # the pipeline's grid linspace(1, 0, N + 1)[:-1] is the teacher's default uniform grid through the static shift,
    # and the grid fewstep's teacher sampler (eval, sample) runs on the pipeline's scheduler
    sigmas = np.linspace(1.0, 0.0, STEPS + 1)[:-1]
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, sigmas=sigmas)
    torch.testing.assert_close(taus, teacher_taus(teacher.schedule, STEPS), atol=1e-6, rtol=0)
    assert torch.equal(teacher_grid(teacher, STEPS)[0], taus)
    assert not torch.allclose(scheduler_taus(pipe.scheduler, teacher.schedule, STEPS), taus)  # set_timesteps(N)'s


def test_prompts_carry_both_streams_with_masks(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS)
    assert cond.prompt_embeds.shape == (2, 1000, 32) and cond.prompt_embeds_2.shape == (2, 256, 32)
    assert cond.prompt_embeds_mask.dtype == torch.long and cond.prompt_embeds_mask_2.dtype == torch.long
    lengths = cond.prompt_embeds_mask.sum(1)
    assert lengths[0] < lengths[1] < 1000, "each prompt keeps its own length"
    glyphs = cond.prompt_embeds_mask_2.sum(1)
    assert glyphs[0] == 0 and glyphs[1] > 0, "ByT5 reads only the quoted text"
    assert (cond.prompt_embeds_2[0] == 0).all()
    assert uncond.prompt_embeds_mask_2.sum() == 0 and (uncond.prompt_embeds_mask.sum(1) > 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_hunyuan15_flow_parity_frame_by_frame(teacher, seed):
    x, ref = _pipeline_vs_teacher(teacher, seed, guidance=6.0)
    assert x.shape == ref.shape == (2, 4, 2, 4, 4)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    diffs = [(x[:, :, frame] - ref[:, :, frame]).abs().max().item() for frame in range(x.shape[2])]
    print(f"hunyuan15 seed {seed}: max |Δ| per latent frame {[f'{d:.1e}' for d in diffs]}, max |x| "
          f"{ref.abs().max():.1f}")  # fmt: skip
    assert max(diffs) < 1e-5


def test_hunyuan15_parity_with_negative_prompt_and_guidance_matters(teacher):
    negatives = ["blurry, static", 'a sign that reads "CLOSED"']
    x, ref = _pipeline_vs_teacher(teacher, 0, guidance=4.0, negatives=negatives)
    print(f"hunyuan15 with negatives: max |Δ| = {(x - ref).abs().max():.1e}")
    assert (x - ref).abs().max() < 1e-5
    unguided, _ = _pipeline_vs_teacher(teacher, 0, guidance=1.0)
    assert (unguided - ref).abs().max() > 1e-3, "guidance must change the output for the comparison to mean much"


def test_hunyuan15_vae_decode_and_encode_follow_the_pipeline_one_clip_at_a_time(teacher):
    # AutoencoderKLHunyuanVideo15's mid-block attention fails for a batch of more than one clip (diffusers 0.42):
    # fewstep decodes and encodes clip by clip, each as the pipeline does (latents / scaling_factor, no shift)
    vae = teacher.pipeline.vae
    latents = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="broadcast"):
        vae.decode(latents / vae.config.scaling_factor)
    video = decode_latents(teacher, latents)  # [2, 3, 5, 32, 32] in [0, 1]
    assert video.shape == (2, 3, 5, 32, 32)
    for i in range(2):
        ref = vae.decode(latents[i : i + 1] / vae.config.scaling_factor, return_dict=False)[0]
        torch.testing.assert_close(video[i : i + 1], ((ref + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    encoded = encode_images(teacher, video * 2 - 1)
    assert encoded.shape == latents.shape
    mean = vae.encode(video[1:] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(encoded[1:], mean * vae.config.scaling_factor, atol=1e-5, rtol=1e-5)


def test_unsupported_guiders_are_refused_and_image_to_video_is_told_apart(teacher):
    pipe = teacher.pipeline
    kept = pipe.guider
    try:
        pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7)
        with pytest.raises(ValueError, match="guidance_rescale"):
            detect_family(pipe)
    finally:
        pipe.guider = kept
    i2v = SimpleNamespace(transformer=pipe.transformer, guider=kept, config={"image_encoder": ("transformers", "X")})
    assert detect_family(pipe) == "hunyuan15" and detect_family(i2v) == "hunyuan15_i2v"


def test_teacher_without_text_encoders_keeps_the_vae_it_cannot_be_built_without(teacher):
    # training from a cache leaves the text encoders on disk; HunyuanVideo15Pipeline reads vae.config in __init__
    _, uncond = encode_prompts(teacher, PROMPTS[:1])
    cfg = SimpleNamespace(pretrained="tiny:hunyuan15", guidance_scale=6.0)
    cached = load_teacher(cfg, encoders=False, null_cond=uncond)
    assert cached.pipeline.text_encoder is None and cached.pipeline.text_encoder_2 is None
    assert cached.pipeline.vae is not None and cached.vae_loader is None
    x = torch.randn(latent_shape(cached, 1), generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.5])
    torch.testing.assert_close(cached.denoiser.raw(x, tau, uncond), teacher.denoiser.raw(x, tau, uncond))


def test_loading_drops_diffusers_experimental_guider_notice():
    from fewstep.models.loading import load_pipeline
    from tests.helpers import diffusers_warnings

    with diffusers_warnings() as warned:
        load_pipeline("tiny:hunyuan15")
    assert not [r for r in warned if "Guiders are" in r.getMessage()]
    with diffusers_warnings() as warned:  # outside a load the notice still shows
        ClassifierFreeGuidance()
    assert any("Guiders are" in r.getMessage() for r in warned)


# ---------------------------------------------------------------------------------------------------------------------
# Image-to-video: HunyuanVideo15ImageToVideoPipeline
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_i2v():
    cfg = SimpleNamespace(pretrained="tiny:hunyuan15_i2v", guidance_scale=6.0)
    return load_teacher(cfg)


def first_frame(seed: int = 3):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("seed", [0, 1])
def test_hunyuan15_i2v_parity_frame_by_frame(teacher_i2v, seed):
    teacher = teacher_i2v
    assert teacher.family == "hunyuan15_i2v" and teacher.denoiser.adapter_name == "hunyuan15"
    pipe, image = teacher.pipeline, first_frame()
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0)
    b, c, f, h, w = latent_shape(teacher, len(PROMPTS))
    out = pipe(image=image, prompt=PROMPTS, num_frames=4 * (f - 1) + 1, num_inference_steps=STEPS,
               output_type="latent", generator=torch.Generator().manual_seed(seed)).frames  # fmt: skip
    noise = pipe.prepare_latents(b, c, 8 * h, 8 * w, 4 * (f - 1) + 1, torch.float32, "cpu",
                                 torch.Generator().manual_seed(seed))  # fmt: skip
    cond, uncond = encode_prompts(teacher, PROMPTS, images=[image])
    assert cond.condition_latents.shape == (2, c + 1, f, h, w) and cond.image_embeds.shape == (2, 16, 16)
    assert torch.equal(uncond.image_embeds, cond.image_embeds), "both CFG branches see the first frame"
    x = teacher.sample(noise, cond, teacher_grid(teacher, STEPS)[0], uncond, guidance_scale=6.0)
    diffs = [(x[:, :, frame] - out[:, :, frame]).abs().max().item() for frame in range(f)]
    print(f"hunyuan15_i2v seed {seed}: max |Δ| per latent frame {[f'{d:.1e}' for d in diffs]}, max |x| "
          f"{out.abs().max():.1f}")  # fmt: skip
    assert out.abs().max() > 1 and max(diffs) < 1e-5
    no_image = {"condition_latents": None, "image_embeds": None}
    taus = teacher_grid(teacher, STEPS)[0]
    t2v = teacher.sample(noise, cond.replace(**no_image), taus, uncond.replace(**no_image), guidance_scale=6.0)
    assert (t2v - out).abs().max() > 1e-3, "the first frame must matter for the comparison to mean much"


def test_hunyuan15_i2v_needs_its_first_frame(teacher_i2v):
    with pytest.raises(ValueError, match="first frame: pass images="):
        encode_prompts(teacher_i2v, PROMPTS)
