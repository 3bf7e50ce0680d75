import inspect
import json
import time

import pytest
import torch
from diffusers import (
    ChromaPipeline,
    CogVideoXPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    FluxPipeline,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    LTXPipeline,
    PixArtSigmaPipeline,
    QwenImagePipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    ZImagePipeline,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from fewstep.testing import FAMILIES, build_tiny_pipeline, cache_root, load_tiny_pipeline, tiny_path
from fewstep.testing.tokenizer import clip_tokenizer, t5_tokenizer
from fewstep.testing.zoo import MARKER, ZOO_VERSION

PIPELINE_CLASS = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "sd35": StableDiffusion3Pipeline,
    "qwen_image": QwenImagePipeline,
    "wan21": WanPipeline,
    "wan21_i2v": WanImageToVideoPipeline,
    "wan22": WanPipeline,
    "wan22_ti2v": WanPipeline,
    "ltx": LTXPipeline,
    "pixart_sigma": PixArtSigmaPipeline,
    "sana": SanaPipeline,
    "cogvideox": CogVideoXPipeline,
    "flux2": Flux2Pipeline,
    "chroma": ChromaPipeline,
    "zimage": ZImagePipeline,
    "hunyuan15": HunyuanVideo15Pipeline,
    "hunyuan15_i2v": HunyuanVideo15ImageToVideoPipeline,
}


def _weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return out


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    return tmp_path


def test_build_save_reload_all_families_offline(fresh_cache):
    start = time.perf_counter()
    paths = {family: tiny_path(family) for family in FAMILIES}
    build_s = time.perf_counter() - start
    assert build_s < 30, f"building the tiny zoo took {build_s:.1f}s"
    for family, path in paths.items():
        assert path == fresh_cache / "tiny" / family == cache_root() / family
        assert (path / "model_index.json").is_file()
        assert json.loads((path / MARKER).read_text())["version"] == ZOO_VERSION
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
        assert type(pipe) is PIPELINE_CLASS[family]
        # The saved weights are exactly the seeded build.
        built, loaded = _weights(build_tiny_pipeline(family)), _weights(pipe)
        assert built.keys() == loaded.keys()
        assert all(torch.equal(built[k], loaded[k]) for k in built)
    assert not [p for p in (fresh_cache / "tiny").iterdir() if p.name.startswith(".")], "temporary dirs left over"


def test_cache_is_reused_and_stale_versions_rebuilt(fresh_cache):
    path = tiny_path("sd15")
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert tiny_path("sd15") == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    (path / MARKER).write_text(json.dumps({"family": "sd15", "version": ZOO_VERSION - 1, "resolution": 16}))
    (path / "junk.txt").write_text("old build")
    assert tiny_path("sd15") == path
    assert not (path / "junk.txt").exists()
    assert json.loads((path / MARKER).read_text())["version"] == ZOO_VERSION


def test_weights_are_seeded():
    a, b, c = (_weights(build_tiny_pipeline("flux", seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    build_tiny_pipeline("sd15")
    assert torch.equal(state, torch.random.get_rng_state()), "building must not consume the global RNG"


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="'sd2'.*sd15, sdxl, sd3, flux"):
        tiny_path("sd2")


def test_family_configs_match_the_real_models():
    sd15 = load_tiny_pipeline("sd15")
    assert isinstance(sd15.scheduler, DDIMScheduler)
    cfg = sd15.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (
        "leading",
        1,
        False,
        False,
    )
    assert sd15.vae.config.scaling_factor == 0.18215

    sdxl = load_tiny_pipeline("sdxl")
    assert isinstance(sdxl.scheduler, EulerDiscreteScheduler)
    assert isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == sdxl.text_encoder.config.hidden_size * 2

    sd3 = load_tiny_pipeline("sd3")
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting
    assert isinstance(sd3.text_encoder_3, T5EncoderModel) and isinstance(sd3.tokenizer_3, T5Tokenizer)
    assert sd3.vae.config.shift_factor == 0.0609

    flux = load_tiny_pipeline("flux")
    assert flux.transformer.config.guidance_embeds
    assert flux.scheduler.config.use_dynamic_shifting
    assert (flux.scheduler.config.base_shift, flux.scheduler.config.max_shift) == (0.5, 1.15)
    assert flux.default_sample_size * flux.vae_scale_factor == 16  # the marker's resolution, not Flux's 1024

    flux2 = load_tiny_pipeline("flux2")
    assert flux2.transformer.config.guidance_embeds and flux2.scheduler.config.use_dynamic_shifting
    layers = inspect.signature(type(flux2).__call__).parameters["text_encoder_out_layers"].default  # (10, 20, 30)
    assert flux2.text_encoder.config.text_config.num_hidden_layers > max(layers)  # each an intermediate layer
    assert flux2.transformer.config.joint_attention_dim == 3 * flux2.text_encoder.config.text_config.hidden_size
    assert flux2.default_sample_size * flux2.vae_scale_factor == 16

    chroma = load_tiny_pipeline("chroma")
    assert isinstance(chroma.text_encoder, T5EncoderModel) and isinstance(chroma.tokenizer, T5Tokenizer)  # T5 alone
    assert chroma.scheduler.config.use_dynamic_shifting
    assert (chroma.vae.config.scaling_factor, chroma.vae.config.shift_factor) == (0.3611, 0.1159)  # FLUX.1's VAE
    assert chroma.transformer.config.joint_attention_dim == chroma.text_encoder.config.d_model
    assert chroma.default_sample_size * chroma.vae_scale_factor == 16

    zimage = load_tiny_pipeline("zimage")  # Tongyi-MAI/Z-Image's static shift 6 (Z-Image-Turbo's: 3)
    assert zimage.scheduler.config.shift == 6.0 and not zimage.scheduler.config.use_dynamic_shifting
    assert zimage.transformer.config.cap_feat_dim == zimage.text_encoder.config.hidden_size
    assert (zimage.vae.config.scaling_factor, zimage.vae.config.shift_factor) == (0.3611, 0.1159)  # FLUX.1's VAE
    assert zimage.default_sample_size * zimage.vae_scale_factor == 16
    template = zimage.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert template == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's layout


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_runs_end_to_end_and_is_fast(family):
    pipe = load_tiny_pipeline(family)
    video = family in ("wan21", "wan21_i2v", "wan22", "wan22_ti2v", "ltx", "cogvideox", "hunyuan15", "hunyuan15_i2v")
    kwargs = {"max_sequence_length": 16} if family in ("sd3", "flux") or video else {}
    if family.startswith("hunyuan15"):  # its text lengths are pipeline attributes, not call arguments
        kwargs = {}
    if video:  # video: the marker's frames (Wan 5 of 32×32 pixels, LTX 9 of 64×64, CogVideoX 9 of 32×32), not the
        # pipelines' defaults
        frames, height, width = pipe.default_video_size
        kwargs.update(num_frames=frames, height=height, width=width)
    side = 32 if family == "sana" else 16  # SanaPipeline wants sides divisible by 32
    if family in ("pixart_sigma", "sana"):  # tiny sample sizes are none of the pipelines' aspect-ratio bins
        kwargs.update(height=side, width=side, use_resolution_binning=False, max_sequence_length=16)
    if family == "zimage":  # ZImagePipeline's 1024 px default is its __call__'s, not a default_sample_size
        kwargs.update(height=side, width=side)
    inputs = {"prompt": "a cat"}
    if family == "wan21_i2v":  # a first frame; the text as embeddings (the I2V pipeline's prompt cleaning needs ftfy)
        from PIL import Image

        text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
        inputs = {"image": Image.new("RGB", (32, 32), (200, 40, 40)), "prompt_embeds": text,
                  "negative_prompt_embeds": torch.zeros_like(text)}  # fmt: skip
    if family == "hunyuan15_i2v":  # a first frame, whose size is the clip's (the pipeline takes no height or width)
        from PIL import Image

        del kwargs["height"], kwargs["width"]
        inputs = {"image": Image.new("RGB", (width, height), (200, 40, 40)), "prompt": "a cat"}
    out = pipe(**inputs, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    images = out.frames if video else out.images
    assert images.shape == ((1, frames, 3, height, width) if video else (1, 3, side, side))
    assert torch.isfinite(images).all()
    backbone = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    fixed = ("context_embedder_2.",) if family.startswith("hunyuan15") else ()  # its ByT5 projection: 2048 wide
    n_params = sum(p.numel() for name, p in backbone.named_parameters() if not name.startswith(fixed))
    assert n_params < 500_000, f"{family} backbone has {n_params} parameters: not tiny"


def test_offline_tokenizers_roundtrip(tmp_path):
    clip = clip_tokenizer()
    ids = clip(["a cat", ""], padding="max_length", max_length=clip.model_max_length, truncation=True).input_ids
    assert (len(clip), clip.model_max_length, clip.bos_token_id, clip.eos_token_id) == (514, 77, 512, 513)
    assert ids[0][0] == 512 and ids[0][1:5] == [320, 66, 64, 339] and ids[0][5] == 513  # "a</w> c a t</w>" eos
    assert ids[1][:2] == [512, 513] and len(ids[1]) == 77
    clip.save_pretrained(tmp_path / "clip")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    assert reloaded(["a cat"]).input_ids == clip(["a cat"]).input_ids

    t5 = t5_tokenizer()
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    t5.save_pretrained(tmp_path / "t5")
    reloaded = T5Tokenizer.from_pretrained(tmp_path / "t5")
    assert reloaded(["a cat!"]).input_ids == t5(["a cat!"]).input_ids
    assert t5(["a cat!"]).input_ids[0][-1] == 1
