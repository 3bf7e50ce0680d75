"""Z-Image: the teacher sampler reproduces ``ZImagePipeline`` on the tiny ``zimage`` model: its CFG ``pos + g·(pos −
neg)`` as ``w = 1 + g``, its ``cfg_normalization`` and ``cfg_truncation``, no CFG at ``g = 0``, and a checkpoint that
shifts by resolution (the pipeline's ``μ``); captions of different lengths travel with their masks and reach the
transformer unpadded, as the pipeline's lists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.kernels import route_attention
from fewstep.models.backbones import latent_shape, num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.families import zimage_guidance_options
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.solvers.grids import teacher_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)
from tests.unit.kernels.test_routing import CountingRoute

# 24 and 64 caption tokens, which the transformer pads to 32 and 64 (multiples of 32): a batch of them is masked
PROMPTS = ["a cat", "a red car parked on a long empty road at dusk"]
STEPS = 4


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="tiny:zimage"))


def _pipeline_vs_teacher(teacher, seed: int, g: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher latents, pipeline latents) ``[b, c, h, w]`` at the pipeline's guidance ``g`` (``options``: its
    ``cfg_normalization`` / ``cfg_truncation``, given to the teacher as ``load_teacher`` does)."""
    pipe = teacher.pipeline
    shape = latent_shape(teacher, len(PROMPTS))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    side = shape[-1] * pipe.vae_scale_factor
    out = pipe(prompt=list(PROMPTS), height=side, width=side, num_inference_steps=STEPS, guidance_scale=g,
               latents=noise.clone(), output_type="latent", **options).images  # fmt: skip
    teacher.guidance_scale, teacher.cfg_rescale, teacher.guidance_off = 1.0 + g, None, None
    zimage_guidance_options(teacher, SimpleNamespace(**options))
    cond, uncond = encode_prompts(teacher, PROMPTS)
    taus = teacher_taus(teacher.schedule, STEPS, num_tokens(teacher.denoiser, shape))  # what fewstep samples
    return teacher.sample(noise, cond, taus, uncond), out


def test_zimage_captions_keep_their_lengths(teacher):
    cond, uncond = encode_prompts(teacher, PROMPTS)
    captions, _ = teacher.pipeline.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert cond.prompt_embeds_mask.sum(1).tolist() == [len(c) for c in captions]
    for pe, mask, caption in zip(cond.prompt_embeds, cond.prompt_embeds_mask, captions, strict=True):
        assert torch.equal(pe[mask.bool()], caption)
    assert cond.prompt_embeds.shape[-1] == teacher.pipeline.transformer.config.cap_feat_dim
    both = Conditioning.cat([uncond, cond])  # the negative "" is shorter: padded with masked zeros
    assert both.prompt_embeds_mask[:2].sum(1).tolist() == uncond.prompt_embeds_mask.sum(1).tolist()


@pytest.mark.parametrize(
    ("seed", "g", "options"),
    [
        (0, 0.0, {}),  # no CFG: one branch
        (0, 3.0, {}),
        (1, 3.0, {"cfg_normalization": 1.0}),  # the pipeline's cfg_normalization=True
        (0, 5.0, {"cfg_normalization": 1.5, "cfg_truncation": 0.2}),  # guidance off on the last step
    ],
)
def test_zimage_teacher_reproduces_the_pipeline(teacher, seed, g, options):
    x, ref = _pipeline_vs_teacher(teacher, seed, g, **options)
    diff = (x - ref).abs().max().item()
    print(f"zimage g={g} {options}: max |teacher − pipeline| = {diff:.2e}")
    assert ref.abs().max() > 1, "a trivially small output would make the check meaningless"
    assert diff < 1e-5


def test_zimage_options_change_the_samples(teacher):
    """The options the parity test covers must act on the tiny model, or their parity would prove nothing."""
    plain, _ = _pipeline_vs_teacher(teacher, 0, 5.0)
    for options in ({"cfg_normalization": 1.0}, {"cfg_truncation": 0.2}):  # shift 6, 4 steps: last t_norm 0.33
        changed, _ = _pipeline_vs_teacher(teacher, 0, 5.0, **options)
        assert (changed - plain).abs().max() > 1e-2, options


def test_zimage_truncation_holds_for_an_explicit_guidance_scale(teacher):
    """Objectives pass their own ``w`` (DMD2's real branch, sCM's target): past ``cfg_truncation`` the teacher still
    returns the conditional output alone, before it the guided one."""
    teacher.cfg_rescale, teacher.guidance_off = None, None
    zimage_guidance_options(teacher, SimpleNamespace(cfg_truncation=0.2))
    cond, uncond = encode_prompts(teacher, PROMPTS)
    x = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(3))
    late, early = torch.full((2,), 0.7), torch.full((2,), 0.9)  # (1000 − t) / 1000 = 0.3 > 0.2 and 0.1 ≤ 0.2
    alone = teacher.raw(x, late, cond, uncond, guidance_scale=1.0)
    assert torch.allclose(teacher.raw(x, late, cond, uncond, guidance_scale=6.0), alone, atol=1e-6)
    guided = teacher.raw(x, early, cond, uncond, guidance_scale=6.0)
    assert (guided - teacher.raw(x, early, cond, uncond, guidance_scale=1.0)).abs().max() > 1e-2
    teacher.guidance_off = None


def test_zimage_dynamic_shift_reproduces_the_pipeline(teacher, tmp_path):
    """A Z-Image checkpoint shifting by resolution: the pipeline's ``μ`` from ``(h/2)·(w/2)`` image tokens."""
    pipe = teacher.pipeline
    static = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(static.config, use_dynamic_shifting=True)
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.scheduler = static
    dynamic = load_teacher(SimpleNamespace(pretrained=str(tmp_path)))
    assert dynamic.schedule.use_dynamic_shifting
    dynamic.pipeline.default_sample_size = pipe.default_sample_size  # the tiny resolution (no marker in tmp_path)
    x, ref = _pipeline_vs_teacher(dynamic, 2, 3.0)
    print(f"zimage dynamic shift: max |teacher − pipeline| = {(x - ref).abs().max().item():.2e}")
    assert (x - ref).abs().max() < 1e-5


def test_zimage_options_refused_elsewhere():
    flux = SimpleNamespace(family="flux")
    with pytest.raises(ValueError, match="ZImagePipeline's options"):
        zimage_guidance_options(flux, SimpleNamespace(cfg_normalization=1.0, cfg_truncation=1.0))


def test_zimage_vae_round_trip_uses_the_flux_layout(teacher):
    """``ZImagePipeline`` decodes ``latents / scaling_factor + shift_factor``: encoding inverts it."""
    images = torch.rand(1, 3, 16, 16)
    latents = encode_images(teacher, images * 2 - 1)
    assert latents.shape == latent_shape(teacher, 1)
    vae = teacher.pipeline.vae
    raw = vae.encode(images * 2 - 1).latent_dist.mean
    expected = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(latents, expected, atol=1e-6)
    assert decode_latents(teacher, latents).shape == (1, 3, 16, 16)


def test_zimage_jvp_through_captions_of_different_lengths(teacher, monkeypatch):
    """Batched captions of different lengths make the transformer pad and mask every attention: ``torch.func.jvp``
    through the routed (masked) attention equals math attention and central differences (the single-prompt case is
    in the routing test's families)."""
    cond, _ = encode_prompts(teacher, PROMPTS)
    tau = torch.full((2,), 0.5)
    x = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(0))
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def fn(x):
        return teacher.denoiser.raw(x, tau, cond)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tangent = torch.func.jvp(fn, (x,), (dx,))
    counter = CountingRoute(monkeypatch)
    with torch.no_grad(), route_attention(teacher.denoiser.backbone):
        out, tangent = torch.func.jvp(fn, (x,), (dx,))
    assert counter.calls > 0, "masked attention takes fewstep's route"
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        h = 1e-2
        fd = (fn(x + h * dx) - fn(x - h * dx)) / (2 * h)
    assert (tangent - fd).abs().max() < 2e-3 * max(1.0, float(fd.abs().max()))
