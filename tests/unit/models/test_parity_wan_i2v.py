"""Wan 2.1 image-to-video: fewstep's teacher reproduces ``WanImageToVideoPipeline``'s latents for the same first
frame, prompts, seed, steps and guidance, frame by frame. The first frame reaches the backbone as the pipeline builds
it (``first_frame_conditioning``): the frame mask and the VAE latents of the image and zero frames, concatenated to the
noisy latents' channels, and the CLIP vision tokens of the image; the unconditional branch keeps both.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.models.backbones import latent_shape, num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts, first_frame_conditioning
from fewstep.solvers.grids import scheduler_taus

PROMPTS = ["a cat walking on grass", "a red car at night"]
STEPS = 4
MAX_TOKENS = 32  # UMT5 tokens: the default 512 only pads with zeros


def first_frame(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def teacher():
    cfg = SimpleNamespace(pretrained="tiny:wan21_i2v", family="auto", dtype="float32", guidance_scale=5.0,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _pipeline_vs_teacher(teacher, image, seed: int, guidance: float, negatives=None):
    pipe = teacher.pipeline
    b, c, f, h, w = latent_shape(teacher, len(PROMPTS))
    frames, height, width = 4 * (f - 1) + 1, h * 8, w * 8
    cond, uncond = encode_prompts(teacher, PROMPTS, negatives, max_sequence_length=MAX_TOKENS, images=[image])
    # the stock pipeline gets the text embeddings: its own prompt cleaning needs ftfy (see fewstep.models.prompts._wan)
    ref = pipe(image=image, prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=uncond.prompt_embeds,
               height=height, width=width, num_frames=frames, num_inference_steps=STEPS, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(seed)).frames  # fmt: skip
    noise = torch.randn((b, c, f, h, w), generator=torch.Generator().manual_seed(seed))  # prepare_latents' draw
    taus = scheduler_taus(pipe.scheduler, teacher.schedule, STEPS, num_tokens=num_tokens(teacher.denoiser, noise.shape))
    return teacher.sample(noise, cond, taus, uncond, guidance_scale=guidance), ref


def test_family_shapes_and_first_frame_conditioning(teacher):
    assert teacher.family == "wan21_i2v" and teacher.denoiser.adapter_name == "wan"
    assert teacher.pipeline.transformer.config.in_channels == 36
    assert latent_shape(teacher, 2) == (2, 16, 2, 4, 4)  # the noise: 16 of the 36 input channels
    image = first_frame(0)
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS, images=[image])
    assert cond.condition_latents.shape == (2, 4 + 16, 2, 4, 4) and cond.image_embeds.shape == (2, 17, 32)
    mask = cond.condition_latents[:, :4]
    assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all()), "only the first frame is given"
    assert torch.equal(uncond.condition_latents, cond.condition_latents)  # the null branch sees the same image
    assert torch.equal(uncond.image_embeds, cond.image_embeds)
    # a [b, 3, H, W] tensor in [-1, 1] (a batch's first frames) gives what the same 8-bit image gives
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    from_tensor = first_frame_conditioning(teacher.pipeline, pixels)
    torch.testing.assert_close(from_tensor.condition_latents, cond.condition_latents[:1], atol=1e-6, rtol=0)
    two = first_frame_conditioning(teacher.pipeline, [image, first_frame(1)])
    assert (two.condition_latents[0] - two.condition_latents[1]).abs().max() > 1e-3


def test_first_frames_are_required_and_checked(teacher):
    with pytest.raises(ValueError, match="first frame: pass images="):
        encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS)
    with pytest.raises(ValueError, match="3 first frames for 2 prompts"):
        encode_prompts(teacher, PROMPTS, max_sequence_length=MAX_TOKENS, images=[first_frame(i) for i in range(3)])
    text_only, _ = encode_prompts(teacher, PROMPTS[:1], max_sequence_length=MAX_TOKENS, images=[first_frame()])
    x = torch.zeros(latent_shape(teacher, 1))
    with pytest.raises(ValueError, match="36 input channels but got 16"):
        teacher.denoiser.raw(x, torch.tensor([0.5]), Conditioning(prompt_embeds=text_only.prompt_embeds))


@pytest.mark.parametrize("seed", [0, 1])
def test_wan21_i2v_parity_frame_by_frame(teacher, seed):
    x, ref = _pipeline_vs_teacher(teacher, first_frame(seed), seed, guidance=5.0)
    assert x.shape == ref.shape == (2, 16, 2, 4, 4)
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    for frame in range(x.shape[2]):
        print(f"seed {seed} latent frame {frame}: max |Δ| = {(x[:, :, frame] - ref[:, :, frame]).abs().max():.2e}")
        assert (x[:, :, frame] - ref[:, :, frame]).abs().max() < 1e-5, f"latent frame {frame}"


def test_wan21_i2v_parity_with_negatives_and_the_image_matters(teacher):
    negatives = ["blurry, static", "low quality"]
    x, ref = _pipeline_vs_teacher(teacher, first_frame(0), 0, guidance=4.0, negatives=negatives)
    assert (x - ref).abs().max() < 1e-5
    other, _ = _pipeline_vs_teacher(teacher, first_frame(5), 0, guidance=4.0, negatives=negatives)
    assert (other - ref).abs().max() > 1e-3, "the first frame must change the output for the comparison to mean much"


def test_text_to_video_families_take_no_images():
    t2v = load_teacher(SimpleNamespace(pretrained="tiny:wan21", family="auto", dtype="float32", revision=None,
                                       variant=None))  # fmt: skip
    with pytest.raises(ValueError, match="the wan21 teacher takes none"):
        encode_prompts(t2v, PROMPTS, max_sequence_length=MAX_TOKENS, images=[first_frame()])
