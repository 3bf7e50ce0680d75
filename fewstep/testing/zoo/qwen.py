"""Tiny pipelines with Qwen text encoders: Qwen-Image (Qwen2.5-VL) and Z-Image (Qwen3)."""

from __future__ import annotations

from typing import Any

from fewstep.testing.tokenizer import (
    qwen2_tokenizer,
    qwen3_tokenizer,
)
from fewstep.testing.zoo.common import (
    tiny_vae,
)


def tiny_qwen2_5_vl() -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {"bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 256}  # qwen2_tokenizer's special tokens
    text = dict(
        vocab_size=259, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2
        tie_word_embeddings=False, **ids,
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
        spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0], in_channels=3,
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=259, image_token_id=255, video_token_id=254,
        vision_start_token_id=253, vision_end_token_id=252, **ids,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen_image() -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed in 2×2 patches
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = the text encoder's width
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],  # one downsampling: vae_scale_factor = 2
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],  # Qwen-Image's first four channels
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler config
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_qwen2_5_vl(),
        tokenizer=qwen2_tokenizer(),
        transformer=transformer,
    )


def tiny_qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(  # qwen3_tokenizer's 261 tokens; <|endoftext|> pads, <|im_end|> ends a turn
        vocab_size=261, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=258, pad_token_id=256,
    )  # fmt: skip
    return Qwen3Model(config).eval()


def build_zimage() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,  # = the text encoder's width (Z-Image: Qwen3-4B's 2560)
        axes_dims=[4, 6, 6],  # (caption/frame, height, width) rotary axes; sums to the head width 16
        axes_lens=[1024, 64, 64],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=tiny_vae(0.3611, 0.1159, quant_conv=False), text_encoder=tiny_qwen3(),
        tokenizer=qwen3_tokenizer(), transformer=transformer,
    )  # fmt: skip
