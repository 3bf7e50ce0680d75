import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline, UNet2DModel

from fewstep.models.backbones import (
    ADAPTER_BY_CLASS,
    BACKBONES,
    adapter_for,
    flux_adapter,
    flux_image_ids,
    num_tokens,
    pack_latents,
    sd3_adapter,
    unet2d_adapter,
    unet2d_condition_adapter,
    unpack_latents,
)
from fewstep.models.conditioning import Conditioning
from fewstep.models.prompts import encode_with_pipeline
from fewstep.testing import load_tiny_pipeline


@pytest.fixture(scope="module")
def pipes():
    return {family: load_tiny_pipeline(family) for family in ("sdxl", "sd3", "flux")}


def _class_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=11,
    ).eval()  # fmt: skip


def test_registered_names():
    assert {"unet2d", "unet2d_condition", "sd3", "flux", "custom"} <= set(BACKBONES.names())
    assert set(ADAPTER_BY_CLASS.values()) <= set(BACKBONES.names())
    assert adapter_for(_class_unet()) == "unet2d"
    with pytest.raises(ValueError, match="No backbone adapter for 'Linear'.*Teacher.from_module"):
        adapter_for(torch.nn.Linear(2, 2))


def test_pack_unpack_match_flux_pipeline():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    # FluxPipeline._unpack_latents takes image pixels (latent × vae_scale_factor).
    assert torch.equal(FluxPipeline._unpack_latents(packed, 16, 12, 2), x)
    assert torch.equal(flux_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_num_tokens_is_what_each_backbone_sees_and_what_flux_shifts_by():
    """Flux: the packed sequence length; SD3: patches of ``patch_size``; UNets and custom modules: none. A student
    built from its teacher's adapter callable keeps the rule, and the Flux pipeline's μ reads the same count."""
    from types import SimpleNamespace

    from fewstep.models.backbones import latent_shape
    from fewstep.models.loading import load_teacher
    from fewstep.models.student import Student
    from fewstep.models.teacher import Teacher
    from fewstep.noise.schedules import FlowSchedule

    flux = load_teacher(SimpleNamespace(pretrained="tiny:flux"))
    for resolution in (16, 48):
        shape = latent_shape(flux, 2, resolution)
        assert num_tokens(flux.denoiser, shape) == pack_latents(torch.zeros(shape)).shape[1]
    assert num_tokens(Student.full(flux).denoiser, (1, 4, 8, 6)) == 12
    assert num_tokens(flux.denoiser, (4, 8, 6)) is None  # not a [b, c, h, w] latent
    sd3 = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))
    assert num_tokens(sd3.denoiser, (1, 4, 8, 8)) == (8 // sd3.denoiser.backbone.config.patch_size) ** 2
    custom = Teacher.from_module(torch.nn.Conv2d(1, 1, 1), FlowSchedule(use_dynamic_shifting=True), "flow")
    assert num_tokens(custom.denoiser, (1, 1, 8, 8)) is None
    assert num_tokens(load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp")).denoiser, (1, 1, 8, 8)) is None


def test_unet2d_adapter_passes_class_labels():
    unet = _class_unet()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 999])
    labels = torch.tensor([1, 2, 10])
    with torch.no_grad():
        out = unet2d_adapter(unet, x, t, Conditioning(class_labels=labels))
        ref = unet(x, t, class_labels=labels).sample
        other = unet2d_adapter(unet, x, t, Conditioning(class_labels=torch.tensor([3, 3, 3])))
    assert torch.equal(out, ref)
    assert (out - other).abs().max() > 1e-4


def test_unet2d_condition_adapter_sdxl_matches_direct_call(pipes):
    pipe = pipes["sdxl"]
    cond, _ = encode_with_pipeline(pipe, "sdxl", ["a cat", "a dog"], resolution=16)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 501.0])
    with torch.no_grad():
        out = unet2d_condition_adapter(pipe.unet, x, t, cond)
        ref = pipe.unet(
            x, t, encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids},
        ).sample  # fmt: skip
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="SDXL backbone needs `cond.time_ids`"):
        unet2d_condition_adapter(pipe.unet, x, t, cond.replace(time_ids=None))


def test_sd3_adapter_matches_direct_call_and_casts_to_bf16(pipes):
    pipe = pipes["sd3"]
    cond, _ = encode_with_pipeline(pipe, "sd3", ["a cat"], max_sequence_length=8)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([750.0])
    with torch.no_grad():
        out = sd3_adapter(pipe.transformer, x, t, cond)
        ref = pipe.transformer(
            hidden_states=x, encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds, timestep=t,
        ).sample  # fmt: skip
        assert torch.equal(out, ref)
        bf16 = pipe.transformer.to(torch.bfloat16)
        try:
            low = sd3_adapter(bf16, x.bfloat16(), t, cond)  # fp32 conditioning is cast to the backbone dtype
        finally:
            pipe.transformer.to(torch.float32)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1


def test_flux_adapter_is_the_pipeline_call_on_unpacked_latents(pipes):
    pipe = pipes["flux"]
    cond, _ = encode_with_pipeline(pipe, "flux", ["a cat", "a dog"], max_sequence_length=8, guidance=3.5)
    x = torch.randn(2, 4, 8, 8)
    s = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        out = flux_adapter(pipe.transformer, x, s, cond)
        t = s * 1000  # FluxPipeline: timestep = t / 1000 with t = 1000·s; guidance = the raw scale
        ref = pipe.transformer(
            hidden_states=pack_latents(x), timestep=t / 1000, guidance=torch.full([2], 3.5),
            pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.txt_ids, img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        ).sample  # fmt: skip
        lower = flux_adapter(pipe.transformer, x, s, cond.replace(guidance=torch.full([2], 1.0)))
    assert out.shape == x.shape
    assert torch.equal(out, unpack_latents(ref, 8, 8))
    assert (out - lower).abs().max() > 1e-5, "the guidance embedding must reach the model"
    with pytest.raises(ValueError, match="needs `cond.guidance`"):
        flux_adapter(pipe.transformer, x, s, cond.replace(guidance=None))


def test_denoiser_finds_diffusers_adapters_without_importing_them():
    code = (
        "import torch\n"
        "from fewstep.models.denoiser import Denoiser\n"
        "from fewstep.noise.schedules import FlowSchedule\n"
        "d = Denoiser(torch.nn.Identity(), FlowSchedule(), 'flow', 'unet2d')\n"
        "print(d.adapter_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "unet2d"
