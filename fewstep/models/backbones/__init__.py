"""Backbone adapters for diffusers model families, registered in ``BACKBONES``.

An adapter is ``adapter(backbone, x, timestep, cond) -> raw output``: it knows one family's call signature, feeds
``timestep = schedule.model_timestep(τ)`` as the model expects it, and returns the native output
(``return_dict=False``, element ``[0]``) with the same shape as ``x``. Conditioning tensors are cast to the dtype of
``x`` (the backbone's dtype). Conversion of the output to ``(x̂0, ε̂)`` happens in ``Denoiser``.

========================  ===========================  ===============================================================
name                      model                        inputs
========================  ===========================  ===============================================================
``unet2d``                ``UNet2DModel``              ``sample``, ``timestep``, ``class_labels``
``unet2d_condition``      ``UNet2DConditionModel``     + ``encoder_hidden_states``, ``timestep_cond``,
                                                       ``added_cond_kwargs={text_embeds, time_ids}`` (SDXL)
``sd3``                   ``SD3Transformer2DModel``    ``hidden_states``, ``encoder_hidden_states``,
                                                       ``pooled_projections``, ``timestep`` (= 1000·s)
``flux``                  ``FluxTransformer2DModel``   packed 2×2 latents, ``timestep`` (= s), ``guidance``,
                                                       ``pooled_projections``, ``encoder_hidden_states``,
                                                       ``txt_ids``, ``img_ids``
``flux2``                 ``Flux2Transformer2DModel``  patchified latents as tokens, ``timestep`` (= s), ``guidance``,
                                                       ``encoder_hidden_states``, ``txt_ids``, ``img_ids`` (4-D)
``qwen_image``            ``QwenImageTransformer2DModel``  packed 2×2 latents, ``timestep`` (= s),
                                                       ``encoder_hidden_states`` (+ ``_mask``), ``img_shapes``
``chroma``                ``ChromaTransformer2DModel``  packed 2×2 latents (as Flux), ``timestep`` (= s), T5
                                                       ``encoder_hidden_states``, ``txt_ids``, ``img_ids``, the
                                                       joint ``attention_mask`` over text and image tokens
``zimage``                ``ZImageTransformer2DModel``  lists of ``[c, 1, h, w]`` latents and of unpadded Qwen3 caption
                                                       states, ``t`` (= 1 − s, reversed); output negated
``wan``                   ``WanTransformer3DModel``    video latents ``[b, c, f, h, w]``, ``encoder_hidden_states``
                                                       (UMT5), ``timestep`` (= 1000·s)
``wan_class``             ``WanTransformer3DModel``    pixel clips ``[b, c, f, h, w]``, the class label as one one-hot
                                                       text token (``text_dim`` = classes + null), ``timestep``
``wan_experts``           ``WanExperts`` (Wan 2.2)     as ``wan``; ``transformer`` at ``timestep ≥ boundary``,
                                                       ``transformer_2`` below it
``ltx``                   ``LTXVideoTransformer3DModel``  video latents packed into tokens, ``timestep`` (= 1000·s),
                                                       ``encoder_hidden_states`` (T5) + ``encoder_attention_mask``,
                                                       ``num_frames``/``height``/``width``,
                                                       ``rope_interpolation_scale``
``pixart``                ``PixArtTransformer2DModel``  latents, ``timestep`` (VP index), T5 ``encoder_hidden_states``
                                                       + ``encoder_attention_mask``; ε of a learned-σ output
``sana``                  ``SanaTransformer2DModel``   latents, ``timestep`` (= 1000·s · ``timestep_scale``), Gemma
                                                       ``encoder_hidden_states`` + ``encoder_attention_mask``
``cogvideox``             ``CogVideoXTransformer3DModel``  video latents as ``[b, f, c, h, w]``, ``timestep``
                                                       (VP index), T5 ``encoder_hidden_states``, 3-D rotary
                                                       embeddings (5b)
``hunyuan15``             ``HunyuanVideo15Transformer3DModel``  video latents with condition latents and mask on the
                                                       channels (zero, or the first frame's), ``timestep`` (=
                                                       1000·s), Qwen2.5-VL and ByT5 tokens with their masks,
                                                       vision tokens (zero, or SigLIP's of the first frame)
========================  ===========================  ===============================================================

One module per family (``unet``, ``image_dits``, ``flux``, ``qwen_image``, ``zimage``, ``wan``, ``ltx``,
``cogvideox``, ``hunyuan15``) holds its adapter and its packing rules; ``shapes`` holds the shape rules of every family
(the latent shape a pipeline denoises, the image tokens a backbone sees, the frame and side rules of video); ``common``
holds the registry and the class → adapter table. Importing this package registers every adapter.
"""

from __future__ import annotations

from fewstep.models.backbones import (
    hunyuan15,  # noqa: F401  (registers its adapters)
    zimage,  # noqa: F401  (registers its adapters)
)
from fewstep.models.backbones.cogvideox import (
    COGVIDEOX_LAYOUT,
    renoise_layout,
)
from fewstep.models.backbones.common import (
    ADAPTER_BY_CLASS,
    BACKBONES,
    BackboneAdapter,
    adapter_for,
)
from fewstep.models.backbones.flux import (
    chroma_attention_mask,
    flux_adapter,
    flux_image_ids,
    pack_latents,
    unpack_latents,
)
from fewstep.models.backbones.image_dits import (
    sd3_adapter,
)
from fewstep.models.backbones.ltx import (
    LTX_ROPE_SCALE,
    ltx_pack_latents,
    ltx_rope_interpolation_scale,
    ltx_unpack_latents,
)
from fewstep.models.backbones.qwen_image import (
    qwen_true_cfg_rescale,
)
from fewstep.models.backbones.shapes import (
    default_resolution,
    frame_count_problem,
    has_vae,
    is_hunyuan15_pipeline,
    is_video_pipeline,
    latent_shape,
    num_tokens,
    pipeline_backbone,
    pipeline_sigmas,
    pixel_clip_shape,
    pixel_frame_problem,
    pixel_multiple,
    video_compression,
    video_defaults,
    video_latent_shape,
    video_size_problems,
)
from fewstep.models.backbones.unet import (
    unet2d_adapter,
    unet2d_condition_adapter,
)
from fewstep.models.backbones.wan import (
    WAN_EXPERT_COMPONENTS,
    WanExperts,
    is_wan_experts_pipeline,
    is_wan_image_pipeline,
)

__all__ = [
    "ADAPTER_BY_CLASS",
    "BACKBONES",
    "BackboneAdapter",
    "COGVIDEOX_LAYOUT",
    "LTX_ROPE_SCALE",
    "WAN_EXPERT_COMPONENTS",
    "WanExperts",
    "adapter_for",
    "chroma_attention_mask",
    "default_resolution",
    "flux_adapter",
    "flux_image_ids",
    "frame_count_problem",
    "has_vae",
    "is_hunyuan15_pipeline",
    "is_video_pipeline",
    "is_wan_experts_pipeline",
    "is_wan_image_pipeline",
    "latent_shape",
    "ltx_pack_latents",
    "ltx_rope_interpolation_scale",
    "ltx_unpack_latents",
    "num_tokens",
    "pack_latents",
    "pipeline_backbone",
    "pipeline_sigmas",
    "pixel_clip_shape",
    "pixel_frame_problem",
    "pixel_multiple",
    "qwen_true_cfg_rescale",
    "renoise_layout",
    "sd3_adapter",
    "unet2d_adapter",
    "unet2d_condition_adapter",
    "unpack_latents",
    "video_compression",
    "video_defaults",
    "video_latent_shape",
    "video_size_problems",
]
