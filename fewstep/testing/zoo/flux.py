"""Tiny FLUX.1, Chroma and FLUX.2 pipelines."""

from __future__ import annotations

from typing import Any

from fewstep.testing.tokenizer import (
    MISTRAL_IMAGE_TOKEN_ID,
    clip_tokenizer,
    mistral_tokenizer,
    t5_tokenizer,
)
from fewstep.testing.zoo.common import (
    RESOLUTION,
    tiny_clip,
    tiny_t5,
    tiny_vae,
)

# The tiny FLUX.1-shaped transformer's dimensions (Flux, and Chroma, which keeps FLUX.1's blocks)
FLUX1_TINY_DIMS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels packed in 2×2 patches
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # = T5 width
    "axes_dims_rope": (4, 4, 8),  # sums to attention_head_dim
}


def tiny_flux1_scheduler() -> Any:
    """FLUX.1's scheduler config: shift by resolution between 256 and 4,096 image tokens (also Chroma's and FLUX.2's
    constants; their pipelines compute ``μ`` themselves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux() -> Any:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        **FLUX1_TINY_DIMS,
        pooled_projection_dim=32,  # = CLIP width (Flux uses the pooled output, no projection)
        guidance_embeds=True,
    )
    scheduler = tiny_flux1_scheduler()
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(0.3611, 0.1159, quant_conv=False),
        text_encoder=tiny_clip(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5(d_model=32),
        tokenizer_2=t5_tokenizer(),
    )


def build_chroma() -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    transformer = ChromaTransformer2DModel(
        **FLUX1_TINY_DIMS,
        approximator_num_channels=16,  # timestep (4), guidance (4) and modulation-index (8) embeddings
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    scheduler = tiny_flux1_scheduler()  # ChromaPipeline passes its own μ
    return ChromaPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(0.3611, 0.1159, quant_conv=False),  # FLUX.1's autoencoder, which Chroma keeps
        text_encoder=tiny_t5(d_model=32),
        tokenizer=t5_tokenizer(),
    )


def tiny_mistral3() -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}  # mistral_tokenizer's <s>, </s>, <pad>
    text = dict(
        model_type="mistral", vocab_size=276, hidden_size=16, intermediate_size=24, num_hidden_layers=32,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, **ids,
    )  # fmt: skip
    vision = dict(
        model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        head_dim=8, image_size=16, patch_size=2,
    )  # fmt: skip
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=MISTRAL_IMAGE_TOKEN_ID, spatial_merge_size=1,
        **ids,
    )  # fmt: skip
    return Mistral3ForConditionalGeneration(config).eval()


def build_flux2() -> Any:
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2×2 (FLUX.2: 32 → 128)
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # three hidden-state layers of the 16-wide text encoder, stacked
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l) position axes; sums to attention_head_dim
        guidance_embeds=True,  # FLUX.2 [dev] is guidance-distilled
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),  # two blocks: vae_scale_factor = 2
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    vae.bn.running_mean.normal_(0.0, 0.5)  # statistics of the patchified latents, away from (0, 1) so they count
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = tiny_flux1_scheduler()  # shifts by resolution; Flux2Pipeline computes μ itself
    return Flux2Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_mistral3(),
        tokenizer=mistral_tokenizer(),
        transformer=transformer,
    )
