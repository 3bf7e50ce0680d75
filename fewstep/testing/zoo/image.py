"""Tiny Stable Diffusion 1.5 / XL / 3 / 3.5, PixArt-Σ and Sana pipelines."""

from __future__ import annotations

from typing import Any

from fewstep.testing.tokenizer import (
    clip_tokenizer,
    gemma_tokenizer,
    t5_tokenizer,
)
from fewstep.testing.zoo.common import (
    RESOLUTION,
    SANA_RESOLUTION,
    SD_BETAS,
    tiny_clip,
    tiny_t5,
    tiny_unet,
    tiny_vae,
)


def build_sd15() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(0.18215),
        text_encoder=tiny_clip(),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(sdxl=False),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        **SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        text_encoder=tiny_clip(),
        text_encoder_2=tiny_clip(projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=tiny_unet(sdxl=True),
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_sd3(**transformer_extra: Any) -> Any:
    """The tiny SD3 pipeline; ``transformer_extra``: config keys of later SD3 transformers (SD3.5's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # = T5 width; the two CLIP widths (32 + 32) are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both CLIP projections concatenated
        pos_embed_max_size=16,
        **transformer_extra,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3's and SD3.5's config
        vae=tiny_vae(1.5305, 0.0609, quant_conv=False),
        text_encoder=tiny_clip(projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip(projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=tiny_t5(d_model=64),
        tokenizer_3=t5_tokenizer(),
    )


def build_sd35() -> Any:
    return build_sd3(
        qk_norm="rms_norm",  # SD3.5 Large and Medium
        dual_attention_layers=(0,),  # SD3.5 Medium: blocks 0-12 add an image-only attention (MMDiT-X)
    )


def build_pixart_sigma() -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # ε and the learned variance; the pipeline keeps the first half
        num_layers=2,
        cross_attention_dim=16,  # = heads × head_dim
        sample_size=RESOLUTION // 2,
        patch_size=2,
        caption_channels=32,  # = T5 width
        use_additional_conditions=False,  # PixArt-Σ: no resolution / aspect-ratio embedding
    )
    scheduler = DPMSolverMultistepScheduler(  # PixArt-Σ's scheduler config
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
    )  # fmt: skip
    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(), text_encoder=tiny_t5(d_model=32), vae=tiny_vae(0.13025), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip


def tiny_gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=356, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )  # fmt: skip
    return Gemma2Model(config).eval()


def build_sana() -> Any:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,  # = heads × head_dim
        caption_channels=32,  # = Gemma width
        sample_size=SANA_RESOLUTION // 4,
        patch_size=1,
    )
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")  # DC-AE's: residual, then multi-scale linear attention
    vae = AutoencoderDC(  # three levels: 4× (Sana's f32c32 has six: 32×)
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,  # Sana's DC-AE f32c32
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(  # Sana 1600M 1024px's scheduler config: DPM-Solver++ on flow sigmas
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, algorithm_type="dpmsolver++",
        solver_order=2, timestep_spacing="linspace",
    )  # fmt: skip
    tokenizer = gemma_tokenizer()
    return SanaPipeline(tokenizer=tokenizer, text_encoder=tiny_gemma2(), vae=vae, transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
