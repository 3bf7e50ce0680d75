"""Tiny LTX-Video, CogVideoX and HunyuanVideo 1.5 (text- and image-to-video) pipelines."""

from __future__ import annotations

from typing import Any

import torch

from fewstep.testing.tokenizer import (
    qwen2_chat_tokenizer,
    t5_tokenizer,
)
from fewstep.testing.zoo.common import (
    COGVIDEOX_FRAMES,
    COGVIDEOX_TEXT_TOKENS,
    SD_BETAS,
    VIDEO_RESOLUTION,
    tiny_t5,
)


def tiny_ltx_vae() -> Any:
    from diffusers import AutoencoderKLLTXVideo

    # LTX-Video's layout at width 8: a 4×4 pixel patch and three spatio-temporal downsamplings (32× in space, 8× in
    # time), a decoder conditioned on the decode timestep (LTX-Video 0.9.1 and later).
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=True,
        patch_size=4,
        patch_size_t=1,
    )
    with torch.no_grad():  # LTX keeps its per-channel statistics in buffers (saved with the weights), not the config
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    return vae


def build_ltx() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,  # = heads × head_dim
        num_layers=2,
        caption_channels=32,  # = T5 width
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # LTX-Video's scheduler config
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler, vae=tiny_ltx_vae(), text_encoder=tiny_t5(d_model=32), tokenizer=t5_tokenizer(),
        transformer=transformer,
    )  # fmt: skip


def tiny_cogvideox_vae() -> Any:
    from diffusers import AutoencoderKLCogVideoX

    # CogVideoX's layout at width 8: four levels (8× in space), the first two also 2× in time (4×)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=VIDEO_RESOLUTION, sample_width=VIDEO_RESOLUTION,
        scaling_factor=0.7,  # CogVideoX-5b's (2b: 1.15258426)
    )  # fmt: skip


def build_cogvideox() -> Any:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # the 3-D rotary embedding splits it 4 / 6 / 6 over (frames, height, width)
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,  # = T5 width
        num_layers=2,
        sample_width=VIDEO_RESOLUTION // 8,  # in latent pixels, as CogVideoX's 90 × 60
        sample_height=VIDEO_RESOLUTION // 8,
        sample_frames=COGVIDEOX_FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_TEXT_TOKENS,
        use_rotary_positional_embeddings=True,  # CogVideoX-5b (2b: 3-D sin-cos positions added to the tokens)
    )
    scheduler = CogVideoXDDIMScheduler(  # CogVideoX-2b's scheduler config
        **SD_BETAS, prediction_type="v_prediction", snr_shift_scale=3.0, rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
    )  # fmt: skip
    return CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(d_model=32), vae=tiny_cogvideox_vae(),
                             transformer=transformer, scheduler=scheduler)  # fmt: skip


def tiny_qwen2_5_vl_text() -> Any:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(  # three layers: the pipeline reads the third-to-last hidden state (layer 1's)
        vocab_size=259, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2
        bos_token_id=256, eos_token_id=258, pad_token_id=256,  # qwen2_tokenizer's special tokens
    )  # fmt: skip
    return Qwen2_5_VLTextModel(config).eval()


def tiny_byt5() -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(  # over ByT5Tokenizer's 384 ids (3 specials, 256 bytes, 125 extra ids)
        vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


HUNYUAN15_GUIDANCE = 6.0  # HunyuanVideo 1.5 480p text-to-video's guider (diffusers' conversion script)


def tiny_hunyuan15_parts(task_type: str) -> dict[str, Any]:
    """The components both HunyuanVideo 1.5 pipelines share; the transformer for ``task_type`` (``t2v``, ``i2v``)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer

    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # noisy latents, condition latents (the first frame's, or zero) and their one-channel mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=32,  # = the Qwen text encoder's width
        text_embed_2_dim=32,  # = the ByT5 encoder's width
        image_embed_dim=16,  # = the SigLIP vision width (zero tokens for text-to-video)
        rope_axes_dim=(4, 6, 6),  # (frames, height, width); sums to attention_head_dim
        target_size=VIDEO_RESOLUTION,
        task_type=task_type,
    )
    vae = AutoencoderKLHunyuanVideo15(  # HunyuanVideo 1.5's layout at width 8 and 8× (not 16×) in space, 4× in time
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )  # fmt: skip
    return dict(
        text_encoder=tiny_qwen2_5_vl_text(), tokenizer=qwen2_chat_tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),  # 480p's shift (t2v and i2v)
        text_encoder_2=tiny_byt5(), tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=HUNYUAN15_GUIDANCE),
    )  # fmt: skip


def build_hunyuan15() -> Any:
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline(**tiny_hunyuan15_parts("t2v"))


SIGLIP_SIZE = 16  # the tiny SigLIP's input side: 4×4 patches of 4 pixels (HunyuanVideo 1.5's SigLIP: 27×27 of 14)


def build_hunyuan15_i2v() -> Any:
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                image_size=SIGLIP_SIZE, patch_size=4)  # fmt: skip
    processor = SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE})
    return HunyuanVideo15ImageToVideoPipeline(
        **tiny_hunyuan15_parts("i2v"), image_encoder=SiglipVisionModel(config).eval(), feature_extractor=processor
    )
