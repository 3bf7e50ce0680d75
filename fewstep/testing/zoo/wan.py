"""Tiny Wan 2.1 (text- and image-to-video) and Wan 2.2 (A14B experts, TI2V-5B) pipelines."""

from __future__ import annotations

from typing import Any

import torch

from fewstep.testing.tokenizer import (
    t5_tokenizer,
)
from fewstep.testing.zoo.common import (
    tiny_t5,
)


def tiny_wan_vae() -> Any:
    from diffusers import AutoencoderKLWan

    # Wan's layout (four levels: 8× in space, the last two downsamplings also 2× in time: 4×) at width 4; Wan 2.1's
    # per-channel latents_mean / latents_std defaults are kept.
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])  # fmt: skip


def tiny_wan22_vae() -> Any:
    from diffusers import AutoencoderKLWan

    # Wan 2.2's VAE layout at width 8: 2×2 pixel patches (12 input channels), residual down/upsampling, three
    # downsamplings (16× in space with the patch, 4× in time), 48 latent channels with per-channel statistics.
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(), latents_std=torch.linspace(0.5, 2.0, 48).tolist(),
    )  # fmt: skip


def tiny_wan_transformer(**image: Any) -> Any:
    """The tiny Wan transformer; ``image``: Wan 2.1 I2V's keys (``in_channels``, ``image_dim``,
    ``added_kv_proj_dim``); ``channels``: the latent channels (Wan 2.2 TI2V: 48)."""
    from diffusers import WanTransformer3DModel

    channels = image.pop("channels", 16)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # the 3-D rotary embedding splits it over (frames, height, width)
        in_channels=image.pop("in_channels", channels),
        out_channels=channels,
        text_dim=32,  # = UMT5 width
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **image,
    )


CLIP_VISION_SIZE = 32  # the tiny CLIP vision tower's input side: 4×4 patches of 8 pixels + the class token


def tiny_clip_vision() -> tuple[Any, Any]:
    """A two-layer ``CLIPVisionModel`` (Wan 2.1 I2V reads its penultimate hidden states) and the
    ``CLIPImageProcessor`` that resizes and crops to its input size, with CLIP's normalisation."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=CLIP_VISION_SIZE, patch_size=8, hidden_act="gelu")  # fmt: skip
    side = {"height": CLIP_VISION_SIZE, "width": CLIP_VISION_SIZE}
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_VISION_SIZE}, crop_size=side)
    return CLIPVisionModel(config).eval(), processor


def build_wan21_i2v() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    image_encoder, image_processor = tiny_clip_vision()
    transformer = tiny_wan_transformer(
        in_channels=16 + 4 + 16,  # noisy latents + frame mask (4 per latent frame) + first-frame latents
        image_dim=32,  # = the CLIP vision width
        added_kv_proj_dim=24,  # = heads × head_dim: the image tokens' own keys and values in cross-attention
    )
    return WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(d_model=32, umt5=True),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # flow_shift 3.0 (480p)
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def build_wan21() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(d_model=32, umt5=True),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # flow_shift 3.0 (480p)
        transformer=tiny_wan_transformer(),
    )


def build_wan22() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(d_model=32, umt5=True),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0),  # A14B's sample_shift
        transformer=tiny_wan_transformer(),  # high-noise expert: timesteps ≥ 875
        transformer_2=tiny_wan_transformer(),  # low-noise expert (other weights: the RNG has moved on)
        boundary_ratio=0.875,
    )


def build_wan22_ti2v() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(d_model=32, umt5=True),
        vae=tiny_wan22_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),  # TI2V-5B's flow_shift
        transformer=tiny_wan_transformer(channels=48),
        expand_timesteps=True,  # one timestep per latent token; a given first frame's tokens get 0
    )
