"""A tiny offline model zoo: random-weight pipelines of every supported family, built from configs on a CPU.

Each family is a real diffusers pipeline class with real component classes, shrunk so a backbone forward takes
milliseconds: latents are 8×8 (16×16 pixel images, VAE factor 2), text encoders have two layers of width 32-64.

* ``sd15``: ``StableDiffusionPipeline`` (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``) with a
  ``DDIMScheduler`` configured as Stable Diffusion ships it (scaled-linear betas, ``leading`` spacing,
  ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping).
* ``sdxl``: ``StableDiffusionXLPipeline`` (two CLIP encoders, the second with a projection; ``text_time`` added
  conditioning) with SDXL's ``EulerDiscreteScheduler`` config.
* ``sd3``: ``StableDiffusion3Pipeline`` (two CLIP encoders + a T5 encoder) with ``FlowMatchEulerDiscreteScheduler``
  (static shift 3.0).
* ``sd35``: ``StableDiffusion3Pipeline`` with Stable Diffusion 3.5's transformer features: RMS-normalised queries and
  keys (``qk_norm="rms_norm"``, as in 3.5 Large and Medium) and a second, image-only attention in the first block
  (``dual_attention_layers``, as 3.5 Medium has in its first 13), with 3.5's scheduler (static shift 3.0).
* ``flux``: ``FluxPipeline`` (CLIP + T5, guidance embedding on) with ``FlowMatchEulerDiscreteScheduler`` using
  dynamic (resolution-dependent) shifting as FLUX.1 does.
* ``qwen_image``: ``QwenImagePipeline`` (``QwenImageTransformer2DModel`` on 2×2-packed latents,
  ``AutoencoderKLQwenImage`` with per-channel latent mean and std, a two-layer ``Qwen2_5_VLForConditionalGeneration``
  text encoder with a one-block vision tower) with Qwen-Image's scheduler config (dynamic exponential shift up to 0.9,
  ``shift_terminal`` 0.02).
* ``flux2``: ``Flux2Pipeline`` (FLUX.2 [dev]: ``Flux2Transformer2DModel`` with guidance embedding on 2×2-patchified
  latents, ``AutoencoderKLFlux2`` whose batch-norm statistics normalise the patchified latents, a
  ``Mistral3ForConditionalGeneration`` text encoder of 32 layers so that the pipeline's hidden-state layers 10, 20 and
  30 are intermediate ones as in Mistral Small 3.1, with a one-block Pixtral vision tower; ``mistral_tokenizer``) with
  ``FlowMatchEulerDiscreteScheduler`` shifting by resolution (the pipeline passes its own ``μ``).
* ``chroma``: ``ChromaPipeline`` (``ChromaTransformer2DModel`` on Flux's 2×2-packed latents, its modulations from a
  one-layer approximator; FLUX.1's ``AutoencoderKL``; a T5 encoder alone) with ``FlowMatchEulerDiscreteScheduler``
  shifting by resolution as FLUX.1's (the pipeline computes ``μ`` from the token count).
* ``zimage``: ``ZImagePipeline`` (Z-Image: ``ZImageTransformer2DModel``, a single-stream DiT taking lists of
  ``[c, 1, h, w]`` latents and of unpadded caption states, patch 2; FLUX.1's ``AutoencoderKL`` layout with its scaling
  and shift factors; a two-layer ``Qwen3Model`` text encoder read at its second-to-last hidden state;
  ``qwen3_tokenizer``) with Z-Image's scheduler config (static shift 6.0, as the base model ships it).
* ``wan21``: ``WanPipeline`` (Wan 2.1 text-to-video: ``WanTransformer3DModel``, ``AutoencoderKLWan`` with Wan's
  4× temporal and 8× spatial compression, a ``UMT5EncoderModel``) with ``FlowMatchEulerDiscreteScheduler`` at Wan's
  480p flow shift 3.0. Videos are 5 frames of 32×32 pixels (latents ``[b, 16, 2, 4, 4]``).
* ``wan21_i2v``: ``WanImageToVideoPipeline`` (Wan 2.1 image-to-video: the transformer takes 36 channels, the noisy
  latents followed by the frame mask and the first frame's latents, and attends to CLIP image tokens through
  ``image_dim`` / ``added_kv_proj_dim``; a two-layer ``CLIPVisionModel`` at 32×32 with its ``CLIPImageProcessor``),
  otherwise as ``wan21``.
* ``wan22``: Wan 2.2 T2V-A14B's layout: the same pipeline with two experts, ``transformer`` (high noise) and
  ``transformer_2`` (low noise), switched at ``boundary_ratio = 0.875``, and Wan 2.2 A14B's flow shift 12.0.
* ``wan22_ti2v``: Wan 2.2 TI2V-5B's layout: ``WanPipeline`` with ``expand_timesteps`` (one timestep per latent
  token), Wan 2.2's ``AutoencoderKLWan`` (2×2 pixel patches, residual sampling, 48 latent channels with per-channel
  statistics: 16× in space, 4× in time) and TI2V-5B's flow shift 5.0. Videos are 5 frames of 64×64 pixels (latents
  ``[b, 48, 2, 4, 4]``); ``WanImageToVideoPipeline.from_pretrained`` on the same directory is its image-to-video mode.
* ``ltx``: ``LTXPipeline`` (LTX-Video: ``LTXVideoTransformer3DModel`` on packed video tokens,
  ``AutoencoderKLLTXVideo`` with LTX's 8× temporal and 32× spatial compression, per-channel latent mean and std and a
  timestep-conditioned decoder, a T5 encoder) with LTX-Video's scheduler config (dynamic shift over the video token
  count, ``shift_terminal`` 0.1). Videos are 9 frames of 64×64 pixels (latents ``[b, 8, 2, 2, 2]``).
* ``pixart_sigma``: ``PixArtSigmaPipeline`` (``PixArtTransformer2DModel`` predicting ε with a learned variance:
  ``out_channels = 2 × 4``, no micro-conditions; a T5 encoder) with PixArt-Σ's ``DPMSolverMultistepScheduler`` config
  (linear betas 1e-4…0.02, DPM-Solver++ 2M, ε prediction). Its transformer's ``sample_size`` of 8 is not one of the
  pipeline's aspect-ratio bins: call it with ``use_resolution_binning=False``.
* ``sana``: ``SanaPipeline`` (``SanaTransformer2DModel`` with linear attention, ``AutoencoderDC`` (Sana's DC-AE, here
  4× instead of 32×), a two-layer ``Gemma2Model`` text encoder) with Sana's ``DPMSolverMultistepScheduler`` in flow
  mode (``use_flow_sigmas``, ``flow_shift`` 3.0, flow prediction). ``use_resolution_binning=False`` as above. Images are
  32×32 (``SanaPipeline`` wants sides divisible by 32), the DC-AE compresses 4× instead of Sana's 32×: latents 8×8.
* ``cogvideox``: ``CogVideoXPipeline`` (``CogVideoXTransformer3DModel`` with CogVideoX-5b's 3-D rotary embeddings, on
  latents the pipeline lays out as ``[b, f, c, h, w]``; ``AutoencoderKLCogVideoX`` with CogVideoX's 4× temporal and 8×
  spatial compression and CogVideoX-5b's scaling factor 0.7; a T5 encoder) with CogVideoX-2b's
  ``CogVideoXDDIMScheduler`` config (v-prediction, SNR shift 3, zero terminal SNR, ``trailing`` spacing). Videos are
  9 frames of 32×32 pixels (latents ``[b, 4, 3, 4, 4]`` in fewstep's layout); the transformer reads 16 T5 tokens
  (``max_text_seq_length``, the pipeline's 226).

* ``hunyuan15``: ``HunyuanVideo15Pipeline`` (HunyuanVideo 1.5 text-to-video: ``HunyuanVideo15Transformer3DModel`` taking
  the noisy latents, zero condition latents and a zero mask on its channels (``2c + 1``) and three token streams;
  ``AutoencoderKLHunyuanVideo15``, here 8× instead of 16× in space and 4× in time; a three-layer
  ``Qwen2_5_VLTextModel`` read at its third-to-last hidden state behind ``qwen2_chat_tokenizer``; a ByT5-style
  ``T5EncoderModel`` for quoted glyph text behind transformers' own ``ByT5Tokenizer``, which needs no files; the
  ``ClassifierFreeGuidance`` guider at HunyuanVideo 1.5 480p's scale 6) with ``FlowMatchEulerDiscreteScheduler`` at
  its 480p shift 5.0. Videos are 5 frames of 32×32 pixels (latents ``[b, 4, 2, 4, 4]``, one token per latent pixel).
* ``hunyuan15_i2v``: ``HunyuanVideo15ImageToVideoPipeline`` (HunyuanVideo 1.5 image-to-video: the same transformer
  reading the first frame's latents and mask on its channels and a one-layer ``SiglipVisionModel``'s tokens of it, 16
  at 16×16 pixels, with its ``SiglipImageProcessor``), otherwise as ``hunyuan15``.

Weights are seeded (the same bytes on every machine). A pipeline is saved once with ``save_pretrained`` into
``$FEWSTEP_CACHE/tiny/<family>`` (default ``~/.cache/fewstep/tiny/<family>``), written to a temporary directory and
renamed into place, and loaded back with ``DiffusionPipeline.from_pretrained(dir, local_files_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewstep.testing.tokenizer import (
    MISTRAL_IMAGE_TOKEN_ID,
    clip_tokenizer,
    gemma_tokenizer,
    mistral_tokenizer,
    qwen2_chat_tokenizer,
    qwen2_tokenizer,
    qwen3_tokenizer,
    t5_tokenizer,
)

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

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def cache_root() -> Path:
    """``$FEWSTEP_CACHE/tiny`` or ``~/.cache/fewstep/tiny``."""
    base = os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep"
    return Path(base).expanduser() / "tiny"


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; available: {', '.join(FAMILIES)}.")
    return family


# ---------------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------------


def _clip_config(projection_dim: int | None = None) -> Any:
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


def _clip(projection: bool = False) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if projection:
        return CLIPTextModelWithProjection(_clip_config(projection_dim=32)).eval()
    return CLIPTextModel(_clip_config()).eval()


def _t5(d_model: int, umt5: bool = False) -> Any:
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


def _vae(scaling_factor: float, shift_factor: float | None = None, quant_conv: bool = True) -> Any:
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


def _unet(sdxl: bool) -> Any:
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


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------------------


def _build_sd15() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionPipeline(
        vae=_vae(0.18215),
        text_encoder=_clip(),
        tokenizer=clip_tokenizer(),
        unet=_unet(sdxl=False),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"
    )
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025),
        text_encoder=_clip(),
        text_encoder_2=_clip(projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet(sdxl=True),
        scheduler=scheduler,
        add_watermarker=False,
    )


def _build_sd3(**transformer_extra: Any) -> Any:
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
        vae=_vae(1.5305, 0.0609, quant_conv=False),
        text_encoder=_clip(projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(d_model=64),
        tokenizer_3=t5_tokenizer(),
    )


def _build_sd35() -> Any:
    return _build_sd3(
        qk_norm="rms_norm",  # SD3.5 Large and Medium
        dual_attention_layers=(0,),  # SD3.5 Medium: blocks 0-12 add an image-only attention (MMDiT-X)
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


def _flux1_scheduler() -> Any:
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


def _build_flux() -> Any:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        **FLUX1_TINY_DIMS,
        pooled_projection_dim=32,  # = CLIP width (Flux uses the pooled output, no projection)
        guidance_embeds=True,
    )
    scheduler = _flux1_scheduler()
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(0.3611, 0.1159, quant_conv=False),
        text_encoder=_clip(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(d_model=32),
        tokenizer_2=t5_tokenizer(),
    )


def _build_chroma() -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    transformer = ChromaTransformer2DModel(
        **FLUX1_TINY_DIMS,
        approximator_num_channels=16,  # timestep (4), guidance (4) and modulation-index (8) embeddings
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    scheduler = _flux1_scheduler()  # ChromaPipeline passes its own μ
    return ChromaPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(0.3611, 0.1159, quant_conv=False),  # FLUX.1's autoencoder, which Chroma keeps
        text_encoder=_t5(d_model=32),
        tokenizer=t5_tokenizer(),
    )


def _qwen2_5_vl() -> Any:
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


def _build_qwen_image() -> Any:
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
        scheduler=scheduler, vae=vae, text_encoder=_qwen2_5_vl(), tokenizer=qwen2_tokenizer(), transformer=transformer
    )


def _mistral3() -> Any:
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


def _build_flux2() -> Any:
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
    scheduler = _flux1_scheduler()  # shifts by resolution; Flux2Pipeline computes μ itself
    return Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=_mistral3(), tokenizer=mistral_tokenizer(), transformer=transformer
    )


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(  # qwen3_tokenizer's 261 tokens; <|endoftext|> pads, <|im_end|> ends a turn
        vocab_size=261, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=258, pad_token_id=256,
    )  # fmt: skip
    return Qwen3Model(config).eval()


def _build_zimage() -> Any:
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
        scheduler=scheduler, vae=_vae(0.3611, 0.1159, quant_conv=False), text_encoder=_qwen3(),
        tokenizer=qwen3_tokenizer(), transformer=transformer,
    )  # fmt: skip


def _wan_vae() -> Any:
    from diffusers import AutoencoderKLWan

    # Wan's layout (four levels: 8× in space, the last two downsamplings also 2× in time: 4×) at width 4; Wan 2.1's
    # per-channel latents_mean / latents_std defaults are kept.
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])  # fmt: skip


def _wan22_vae() -> Any:
    from diffusers import AutoencoderKLWan

    # Wan 2.2's VAE layout at width 8: 2×2 pixel patches (12 input channels), residual down/upsampling, three
    # downsamplings (16× in space with the patch, 4× in time), 48 latent channels with per-channel statistics.
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(), latents_std=torch.linspace(0.5, 2.0, 48).tolist(),
    )  # fmt: skip


def _wan_transformer(**image: Any) -> Any:
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


def _clip_vision() -> tuple[Any, Any]:
    """A two-layer ``CLIPVisionModel`` (Wan 2.1 I2V reads its penultimate hidden states) and the
    ``CLIPImageProcessor`` that resizes and crops to its input size, with CLIP's normalisation."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=CLIP_VISION_SIZE, patch_size=8, hidden_act="gelu")  # fmt: skip
    side = {"height": CLIP_VISION_SIZE, "width": CLIP_VISION_SIZE}
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_VISION_SIZE}, crop_size=side)
    return CLIPVisionModel(config).eval(), processor


def _build_wan21_i2v() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    image_encoder, image_processor = _clip_vision()
    transformer = _wan_transformer(
        in_channels=16 + 4 + 16,  # noisy latents + frame mask (4 per latent frame) + first-frame latents
        image_dim=32,  # = the CLIP vision width
        added_kv_proj_dim=24,  # = heads × head_dim: the image tokens' own keys and values in cross-attention
    )
    return WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(d_model=32, umt5=True),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # flow_shift 3.0 (480p)
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def _build_wan21() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(d_model=32, umt5=True),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # flow_shift 3.0 (480p)
        transformer=_wan_transformer(),
    )


def _build_wan22() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(d_model=32, umt5=True),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0),  # A14B's sample_shift
        transformer=_wan_transformer(),  # high-noise expert: timesteps ≥ 875
        transformer_2=_wan_transformer(),  # low-noise expert (other weights: the RNG has moved on)
        boundary_ratio=0.875,
    )


def _build_wan22_ti2v() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(d_model=32, umt5=True),
        vae=_wan22_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),  # TI2V-5B's flow_shift
        transformer=_wan_transformer(channels=48),
        expand_timesteps=True,  # one timestep per latent token; a given first frame's tokens get 0
    )


def _ltx_vae() -> Any:
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


def _build_ltx() -> Any:
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
        scheduler=scheduler, vae=_ltx_vae(), text_encoder=_t5(d_model=32), tokenizer=t5_tokenizer(),
        transformer=transformer,
    )  # fmt: skip


def _build_pixart_sigma() -> Any:
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
        tokenizer=t5_tokenizer(), text_encoder=_t5(d_model=32), vae=_vae(0.13025), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip


def _gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=356, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )  # fmt: skip
    return Gemma2Model(config).eval()


def _build_sana() -> Any:
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
    return SanaPipeline(tokenizer=tokenizer, text_encoder=_gemma2(), vae=vae, transformer=transformer,
                        scheduler=scheduler)  # fmt: skip


def _cogvideox_vae() -> Any:
    from diffusers import AutoencoderKLCogVideoX

    # CogVideoX's layout at width 8: four levels (8× in space), the first two also 2× in time (4×)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=VIDEO_RESOLUTION, sample_width=VIDEO_RESOLUTION,
        scaling_factor=0.7,  # CogVideoX-5b's (2b: 1.15258426)
    )  # fmt: skip


def _build_cogvideox() -> Any:
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
        **_SD_BETAS, prediction_type="v_prediction", snr_shift_scale=3.0, rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
    )  # fmt: skip
    return CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(d_model=32), vae=_cogvideox_vae(),
                             transformer=transformer, scheduler=scheduler)  # fmt: skip


def _qwen2_5_vl_text() -> Any:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(  # three layers: the pipeline reads the third-to-last hidden state (layer 1's)
        vocab_size=259, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2
        bos_token_id=256, eos_token_id=258, pad_token_id=256,  # qwen2_tokenizer's special tokens
    )  # fmt: skip
    return Qwen2_5_VLTextModel(config).eval()


def _byt5() -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(  # over ByT5Tokenizer's 384 ids (3 specials, 256 bytes, 125 extra ids)
        vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


HUNYUAN15_GUIDANCE = 6.0  # HunyuanVideo 1.5 480p text-to-video's guider (diffusers' conversion script)


def _hunyuan15_parts(task_type: str) -> dict[str, Any]:
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
        text_encoder=_qwen2_5_vl_text(), tokenizer=qwen2_chat_tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),  # 480p's shift (t2v and i2v)
        text_encoder_2=_byt5(), tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=HUNYUAN15_GUIDANCE),
    )  # fmt: skip


def _build_hunyuan15() -> Any:
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline(**_hunyuan15_parts("t2v"))


SIGLIP_SIZE = 16  # the tiny SigLIP's input side: 4×4 patches of 4 pixels (HunyuanVideo 1.5's SigLIP: 27×27 of 14)


def _build_hunyuan15_i2v() -> Any:
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                image_size=SIGLIP_SIZE, patch_size=4)  # fmt: skip
    processor = SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE})
    return HunyuanVideo15ImageToVideoPipeline(
        **_hunyuan15_parts("i2v"), image_encoder=SiglipVisionModel(config).eval(), feature_extractor=processor
    )


_BUILDERS: dict[str, Callable[[], Any]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "sd35": _build_sd35,
    "qwen_image": _build_qwen_image,
    "wan21": _build_wan21,
    "wan21_i2v": _build_wan21_i2v,
    "wan22": _build_wan22,
    "wan22_ti2v": _build_wan22_ti2v,
    "ltx": _build_ltx,
    "pixart_sigma": _build_pixart_sigma,
    "sana": _build_sana,
    "cogvideox": _build_cogvideox,
    "flux2": _build_flux2,
    "chroma": _build_chroma,
    "zimage": _build_zimage,
    "hunyuan15": _build_hunyuan15,
    "hunyuan15_i2v": _build_hunyuan15_i2v,
}
# Video families: their marker also records the default frame count (``num_frames``).
_VIDEO: dict[str, dict[str, int]] = {
    family: {"resolution": VIDEO_RESOLUTION, "num_frames": VIDEO_FRAMES} for family in ("wan21", "wan21_i2v", "wan22")
}
_VIDEO["wan22_ti2v"] = {"resolution": TI2V_RESOLUTION, "num_frames": VIDEO_FRAMES}
_VIDEO["ltx"] = {"resolution": LTX_RESOLUTION, "num_frames": LTX_FRAMES}
_VIDEO["cogvideox"] = {"resolution": VIDEO_RESOLUTION, "num_frames": COGVIDEOX_FRAMES}
_VIDEO["hunyuan15"] = _VIDEO["hunyuan15_i2v"] = {"resolution": VIDEO_RESOLUTION, "num_frames": VIDEO_FRAMES}


def build_tiny_pipeline(family: str, seed: int = SEED) -> Any:
    """Build (not save) a tiny random pipeline of ``family``; the same ``seed`` gives the same weights.

    The global RNG state is restored afterwards.
    """
    builder = _BUILDERS[_check_family(family)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


def _is_current(path: Path, family: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("family") == family and marker.get("version") == ZOO_VERSION


def tiny_path(family: str) -> Path:
    """The directory of the tiny ``family`` pipeline, built and saved on first use (atomic: temp dir + rename).

    Args:
        family: one of ``FAMILIES`` (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``wan21``, ``wan22``, ``ltx``,
            ``cogvideox``, ...).

    Returns:
        A ``save_pretrained`` directory loadable with ``DiffusionPipeline.from_pretrained(path)`` offline.
    """
    path = cache_root() / _check_family(family)
    if _is_current(path, family):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=path.parent))
    try:
        build_tiny_pipeline(family).save_pretrained(tmp, safe_serialization=True)
        resolution = SANA_RESOLUTION if family == "sana" else RESOLUTION
        marker = {"family": family, "version": ZOO_VERSION, "resolution": resolution, **_VIDEO.get(family, {})}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _move_into_place(tmp, path, family)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_into_place(tmp: Path, path: Path, family: str) -> None:
    """Rename ``tmp`` to ``path``; a stale ``path`` is renamed away first; a concurrent winner is kept."""
    if path.exists() and not _is_current(path, family):
        stale = Path(tempfile.mkdtemp(prefix=f".{family}-stale-", dir=path.parent))
        try:
            os.replace(path, stale / family)
        except OSError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        if not _is_current(path, family):  # not a concurrent build that finished first
            raise


def apply_resolution_marker(pipe: Any, path: str | os.PathLike) -> None:
    """Give a pipeline loaded from a tiny directory its recorded default resolution (``MARKER``); Flux pipelines
    otherwise assume 128·8 pixels. Video pipelines (Wan, LTX) get ``default_video_size = (frames, height,
    width)``, which ``fewstep.models.backbones.latent_shape`` reads in place of the pipeline's call defaults (Wan
    81 × 480 × 832, LTX 161 × 512 × 704). Directories without the marker are left alone."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return
    recorded = json.loads(marker.read_text())
    if "num_frames" in recorded:
        side = recorded["resolution"]
        pipe.default_video_size = (recorded["num_frames"], side, side)
    elif hasattr(pipe, "default_sample_size") or type(pipe).__name__ == "ZImagePipeline":  # Z-Image: 1024 otherwise
        pipe.default_sample_size = recorded["resolution"] // pipe.vae_scale_factor


def load_tiny_pipeline(family: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load the tiny ``family`` pipeline from its cache directory (built on first use), offline."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    path = tiny_path(family)
    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"  # renamed in diffusers
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **{dtype_key: dtype})
    apply_resolution_marker(pipe, path)
    return pipe
