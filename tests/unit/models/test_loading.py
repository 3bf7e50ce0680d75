import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from fewstep.models.backbones import default_resolution, latent_shape
from fewstep.models.families import detect_family
from fewstep.models.loading import load_pipeline, load_teacher, resolve_pretrained
from fewstep.models.prompts import class_conditioning, encode_prompts
from fewstep.models.vae import decode_latents, encode_images
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.testing import load_tiny_pipeline, tiny_path


def teacher_cfg(pretrained: str, **kw) -> SimpleNamespace:
    fields = {"family": "auto", "dtype": "float32", "guidance_scale": 1.0, "revision": None, "variant": None}
    return SimpleNamespace(pretrained=pretrained, **{**fields, **kw})


@pytest.fixture(scope="module")
def teachers():
    return {f: load_teacher(teacher_cfg(f"tiny:{f}", guidance_scale=2.0)) for f in ("sd15", "sdxl", "sd3", "flux")}


def _digits_like(tmp_path, flow: bool) -> str:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=11,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0) if flow else DDPMScheduler(prediction_type="v_prediction")
    path = tmp_path / ("flow" if flow else "vp")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return str(path)


def test_resolve_pretrained():
    assert resolve_pretrained("tiny:sd3") == str(tiny_path("sd3"))
    assert resolve_pretrained("org/model") == "org/model"
    assert resolve_pretrained("~/x").startswith("/")
    with pytest.raises(ValueError, match="Unknown tiny model family 'sd4'"):
        resolve_pretrained("tiny:sd4")


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "nope" / "pipe"
    with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist.*save_pretrained"):
        load_pipeline(str(missing))


def test_directory_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json.*save_pretrained"):
        load_pipeline(str(tmp_path))


def test_missing_component_is_named(tmp_path):
    copy = tmp_path / "sd15"
    shutil.copytree(tiny_path("sd15"), copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(FileNotFoundError, match=r"component 'vae' \(AutoencoderKL\).*'.*sd15/vae' is missing"):
        load_pipeline(str(copy))
    shutil.copytree(tiny_path("sd15") / "vae", copy / "vae")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"Could not load the pipeline in '.*sd15'.*unet.*save_pretrained"):
        load_pipeline(str(copy))


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="'no-such-org/no-such-model'.*HF_HUB_OFFLINE.*huggingface-cli download"
    ):
        load_pipeline("no-such-org/no-such-model")


def test_detect_family_and_default_resolution():
    for family in ("sd15", "sdxl", "sd3", "flux"):
        pipe = load_tiny_pipeline(family)
        assert detect_family(pipe) == family
        assert default_resolution(pipe) == 16


def test_teacher_fields(teachers):
    sd15, sdxl, sd3, flux = (teachers[f] for f in ("sd15", "sdxl", "sd3", "flux"))
    assert isinstance(sd15.schedule, VPSchedule) and sd15.denoiser.prediction_type == "epsilon"
    assert sd15.schedule.final_alpha_cumprod == pytest.approx(float(sd15.pipeline.scheduler.alphas_cumprod[0]))
    assert sd15.denoiser.adapter_name == sdxl.denoiser.adapter_name == "unet2d_condition"
    assert sd15.denoiser.backbone is sd15.pipeline.unet, "the teacher must not copy the backbone"
    assert isinstance(sd3.schedule, FlowSchedule) and sd3.schedule.timestep_scale == 1000.0
    assert sd3.schedule.shift_factor == 3.0 and sd3.denoiser.prediction_type == "flow"
    assert flux.schedule.timestep_scale == 1.0 and flux.schedule.use_dynamic_shifting
    assert (sd15.guidance_scale, sd3.guidance_scale) == (2.0, 2.0)
    # Guidance-distilled Flux: the recipe's guidance is the embedded one; no true CFG.
    assert flux.guidance_scale == 1.0 and flux.null_cond.guidance.tolist() == [2.0]
    assert all(not p.requires_grad for p in sd15.pipeline.text_encoder.parameters())
    assert not sd15.denoiser.backbone.training
    # Null conditioning: SD1.5 encodes "", SDXL zeroes it (force_zeros_for_empty_prompt).
    null_sd15, _ = encode_prompts(sd15, [""])
    assert torch.equal(sd15.null_cond.prompt_embeds, null_sd15.prompt_embeds)
    assert sdxl.null_cond.prompt_embeds.abs().max() == 0 and sdxl.null_cond.pooled_prompt_embeds.abs().max() == 0


def test_family_mismatch_and_dtype():
    with pytest.raises(ValueError, match="teacher.family is 'sdxl' but 'tiny:sd15' is a sd15 pipeline"):
        load_teacher(teacher_cfg("tiny:sd15", family="sdxl"))
    bf16 = load_teacher(teacher_cfg("tiny:sd3", dtype="bfloat16"))
    assert bf16.denoiser.dtype == torch.bfloat16 and bf16.pipeline.vae.dtype == torch.bfloat16
    cond, _ = encode_prompts(bf16, ["a cat"], max_sequence_length=8)
    pred = bf16.predict(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), cond)
    assert pred.x0.dtype == torch.float32 and torch.isfinite(pred.x0).all()


def test_encode_prompts_shapes(teachers):
    cond, uncond = encode_prompts(teachers["sdxl"], ["a cat", "a dog"], resolution=32)
    assert cond.prompt_embeds.shape == (2, 77, 64) and cond.pooled_prompt_embeds.shape == (2, 32)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert torch.equal(uncond.time_ids, cond.time_ids)
    cond, uncond = encode_prompts(teachers["sd3"], ["a cat"], max_sequence_length=8)
    assert cond.prompt_embeds.shape == (1, 77 + 8, 64) and cond.pooled_prompt_embeds.shape == (1, 64)
    cond, uncond = encode_prompts(teachers["flux"], ["a cat", "a dog"], max_sequence_length=8)
    assert cond.prompt_embeds.shape == (2, 8, 32) and cond.txt_ids.shape == (8, 3)
    assert cond.guidance.tolist() == uncond.guidance.tolist() == [2.0, 2.0]
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    cond, _ = encode_prompts(teachers["flux"], ["a cat"], max_sequence_length=8, guidance=4.0)
    assert cond.guidance.tolist() == [4.0]


def test_decode_and_encode_latents(teachers):
    for family, teacher in teachers.items():
        shape = latent_shape(teacher, 2)
        assert shape == (2, 4, 8, 8), family
        images = decode_latents(teacher, torch.randn(shape))
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
        latents = encode_images(teacher, images * 2 - 1)
        assert latents.shape == shape
    # SD3/Flux normalise with the shift factor: encode = (mean - shift)·scale.
    sd3 = teachers["sd3"]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mean = sd3.pipeline.vae.encode(x).latent_dist.mean
    assert torch.allclose(encode_images(sd3, x), (mean - 0.0609) * 1.5305)


def test_pixel_teacher_from_a_ddpm_pipeline_dir(tmp_path):
    vp = load_teacher(teacher_cfg(_digits_like(tmp_path, flow=False), guidance_scale=3.0))
    assert vp.family == "unet2d" and vp.denoiser.adapter_name == "unet2d"
    assert isinstance(vp.schedule, VPSchedule) and vp.denoiser.prediction_type == "v_prediction"
    assert vp.null_cond.class_labels.tolist() == [10]
    assert latent_shape(vp, 3) == (3, 1, 8, 8)
    cond, uncond = class_conditioning([1, 2], null_class=10)
    assert uncond.class_labels.tolist() == [10, 10]
    x = torch.randn(2, 1, 8, 8)
    assert vp.predict(x, torch.tensor([0.5, 0.5]), cond).x0.shape == x.shape
    assert torch.equal(decode_latents(vp, torch.tensor([[-1.0, 0.0, 1.0, 3.0]])), torch.tensor([[0.0, 0.5, 1.0, 1.0]]))
    flow = load_teacher(teacher_cfg(_digits_like(tmp_path, flow=True)))
    assert isinstance(flow.schedule, FlowSchedule) and flow.schedule.timestep_scale == 1000.0
    assert flow.denoiser.prediction_type == "flow" and flow.family == "unet2d"
    with pytest.raises(ValueError, match="class_conditioning"):
        encode_prompts(flow, ["a cat"])
