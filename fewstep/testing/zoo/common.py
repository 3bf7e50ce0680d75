"""The tiny zoo's constants (families, sizes, the cache version) and the components several families share:
CLIP and T5 text encoders, the SD / FLUX.1 VAE and the SD UNet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = (
    "sd15", "sdxl", "sd3", "flux", "sd35", "qwen_image", "wan21", "wan21_i2v", "wan22", "wan22_ti2v", "ltx",
    "pixart_sigma", "sana", "cogvideox", "flux2", "chroma", "zimage", "hunyuan15", "hunyuan15_i2v",
)  # fmt: skip
ZOO_VERSION = 1  # bump when a config below changes: cached directories of another version are rebuilt
MARKER = "fewstep_tiny.json"  # written last into every tiny directory: {"family", "version", "resolution"}
RESOLUTION = 16  # default image size of every tiny pipeline (latents 8×8)
SEED = 0
SANA_RESOLUTION = 32  # SanaPipeline wants sides divisible by 32: its tiny DC-AE compresses 4× (latents 8×8)
VIDEO_RESOLUTION = 32  # the Wan VAE compresses 8× in space: 4×4 latents, 2×2 tokens per latent frame
VIDEO_FRAMES = 5  # 4k + 1 frames (the Wan VAE compresses 4× in time after the first frame): 2 latent frames
TI2V_RESOLUTION = 64  # the Wan 2.2 VAE compresses 16× in space: 4×4 latents, 2×2 tokens per latent frame
LTX_RESOLUTION = 64  # the LTX VAE compresses 32× in space: 2×2 latents (one token each)
LTX_FRAMES = 9  # 8k + 1 frames (LTX compresses 8× in time after the first frame): 2 latent frames
COGVIDEOX_TEXT_TOKENS = 16  # the tiny transformer's max_text_seq_length (CogVideoX's 226)
# 4k + 1 frames over an odd number of latent frames (3): the CogVideoX VAE decodes latent frames in pairs after an
# odd first batch, so 3 latent frames decode to 9 frames as CogVideoX's 13 decode to its 49
COGVIDEOX_FRAMES = 9

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def cache_root() -> Path:
    """``$FEWSTEP_CACHE/tiny`` or ``~/.cache/fewstep/tiny``."""
    base = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep"
    return Path(base).expanduser() / "tiny"


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; available: {', '.join(FAMILIES)}.")
    return family


def tiny_clip_config(projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    kwargs = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,  # the pooled output is read at the first eos token
        pad_token_id=513,
        **kwargs,
    )


def tiny_clip(projection: bool = False) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if projection:
        return CLIPTextModelWithProjection(tiny_clip_config(projection_dim=32)).eval()
    return CLIPTextModel(tiny_clip_config()).eval()


def tiny_t5(d_model: int, umt5: bool = False) -> Any:
    """A two-layer T5 encoder (``umt5``: Wan's UMT5) over ``t5_tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=98,  # = t5_tokenizer's vocabulary
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


def tiny_vae(scaling_factor: float, shift_factor: float | None = None, quant_conv: bool = True) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),  # two blocks: vae_scale_factor = 2
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def tiny_unet(sdxl: bool) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:  # text_time: 6 micro-conditioning ids × 8 + the second encoder's 32-d projection
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "use_linear_projection": True,
        }
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64 if sdxl else 32,  # SDXL concatenates both encoders' hidden states
        attention_head_dim=8,
        **extra,
    )
