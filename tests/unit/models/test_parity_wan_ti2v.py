"""Wan 2.2 TI2V-5B (``expand_timesteps``): fewstep's teacher reproduces the stock pipelines' latents frame by frame,
text-to-video against ``WanPipeline`` and image-to-video against ``WanImageToVideoPipeline`` on the same weights. In
image-to-video the first latent frame is the VAE latent of the image (``first_frame_latents``), fed with timestep 0
per token; fewstep's prediction of that frame is the frame itself, so sampling ends on it as the pipeline does.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from fewstep.models.backbones import latent_shape, num_tokens, pixel_multiple
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents
from fewstep.solvers.grids import scheduler_taus

PROMPTS = ["a cat walking on grass", "a red car at night"]
STEPS = 4
MAX_TOKENS = 32  # UMT5 tokens: the default 512 only pads with zeros


def first_frame(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def teacher():
    cfg = SimpleNamespace(pretrained="tiny:wan22_ti2v", family="auto", dtype="float32", guidance_scale=5.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


@pytest.fixture(scope="module")
def i2v_pipe(teacher):
    pipe = WanImageToVideoPipeline.from_pretrained(teacher.pipeline.name_or_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _size(teacher) -> dict[str, int]:
    _, _, f, h, w = latent_shape(teacher, 1)
    return {"num_frames": 4 * (f - 1) + 1, "height": 16 * h, "width": 16 * w}


def _teacher_sample(teacher, seed: int, guidance: float, negatives=None, images=None):
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives, max_sequence_length=MAX_TOKENS, images=images)
    noise = torch.randn(latent_shape(teacher, len(PROMPTS)), generator=torch.Generator().manual_seed(seed))
    taus = scheduler_taus(teacher.pipeline.scheduler, teacher.schedule, STEPS,
                          num_tokens=num_tokens(teacher.denoiser, noise.shape))  # fmt: skip
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), cond, uncond


def test_family_and_shapes(teacher):
    assert teacher.family == "wan22_ti2v" and teacher.denoiser.adapter_name == "wan_ti2v"
    assert teacher.schedule.shift_factor == 5.0 and teacher.schedule.timestep_scale == 1000.0
    assert latent_shape(teacher, 2) == (2, 48, 2, 4, 4)  # 5 frames of 64×64: Wan 2.2's VAE is 16× in space
    assert pixel_multiple(teacher) == 32 and num_tokens(teacher.denoiser, (1, 48, 2, 4, 4)) == 2 * 2 * 2
    video = decode_latents(teacher, torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0)))
    assert video.shape == (1, 3, 5, 64, 64)
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS, images=[first_frame()])
    assert cond.first_frame_latents.shape == (2, 48, 1, 4, 4) and cond.condition_latents is None
    assert torch.equal(uncond.first_frame_latents, cond.first_frame_latents)


@pytest.mark.parametrize("seed", [0, 1])
def test_text_to_video_parity_frame_by_frame(teacher, seed):
    x, cond, _ = _teacher_sample(teacher, seed, guidance=5.0)
    ref = teacher.pipeline(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                           max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(seed),
                           **_size(teacher)).frames  # fmt: skip
    assert x.shape == ref.shape == (2, 48, 2, 4, 4) and ref.abs().max() > 1
    for frame in range(x.shape[2]):
        print(f"t2v seed {seed} latent frame {frame}: max |Δ| = {(x[:, :, frame] - ref[:, :, frame]).abs().max():.2e}")
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"


@pytest.mark.parametrize("seed", [0, 1])
def test_image_to_video_parity_frame_by_frame(teacher, i2v_pipe, seed):
    image = first_frame(seed)
    negatives = ["blurry, static", "low quality"]
    x, cond, uncond = _teacher_sample(teacher, seed, guidance=4.0, negatives=negatives, images=[image])
    # the stock pipeline gets the text embeddings: its own prompt cleaning needs ftfy (see fewstep.models.prompts._wan)
    ref = i2v_pipe(image=image, prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=uncond.prompt_embeds,
                   num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(seed), **_size(teacher)).frames  # fmt: skip
    assert x.shape == ref.shape == (2, 48, 2, 4, 4) and ref.abs().max() > 1
    torch.testing.assert_close(x[:, :, :1], cond.first_frame_latents, atol=1e-5, rtol=0)  # the image's own latents
    for frame in range(x.shape[2]):
        print(f"i2v seed {seed} latent frame {frame}: max |Δ| = {(x[:, :, frame] - ref[:, :, frame]).abs().max():.2e}")
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"
    text_only, _, _ = _teacher_sample(teacher, seed, guidance=4.0, negatives=negatives)
    assert (text_only[:, :, 1:] - x[:, :, 1:]).abs().max() > 1e-3, "the first frame must steer the later frames"


def test_the_first_frame_is_predicted_clean_at_every_level(teacher):
    cond, _ = encode_prompts(teacher, PROMPTS[:1], max_sequence_length=MAX_TOKENS, images=[first_frame(2)])
    x = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(3))
    for tau in (0.999, 0.5, 0.01):
        pred = teacher.denoiser(x, torch.tensor([tau]), cond)
        torch.testing.assert_close(pred.x0[:, :, :1], cond.first_frame_latents, atol=1e-4, rtol=0)
        assert (pred.x0[:, :, 1:] - x[:, :, 1:]).abs().max() > 1e-3


def test_shapes_without_the_vae_loaded(teacher):
    # training from a cache leaves the VAE on disk: the 16× spatial factor then comes from its config, not the 8
    # WanPipeline assumes without a VAE
    cfg = SimpleNamespace(pretrained="tiny:wan22_ti2v", family="auto", dtype="float32", revision=None, variant=None)
    bare = load_teacher(cfg, encoders=False, null_cond=teacher.null_cond)
    assert bare.pipeline.vae is None and bare.pipeline.vae_scale_factor_spatial == 16
    assert latent_shape(bare, 1) == latent_shape(teacher, 1) == (1, 48, 2, 4, 4)
