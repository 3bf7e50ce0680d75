"""Prompt encoding with each pipeline's own ``encode_prompt``.

``encode_prompts(teacher, prompts) -> (cond, uncond)`` returns exactly what the diffusers pipeline would feed its
backbone, so teacher sampling reproduces the pipeline (``tests/unit/models/test_parity.py``).

The null (unconditional) prompt is the empty string ``""``, as in every pipeline here, with each pipeline's own
twist: SDXL zeroes its negative embeddings when no negative prompt is given (``force_zeros_for_empty_prompt``,
also DMD2's choice); SD1.5 and SD3 encode ``""``; Flux has no negative branch of its own (its guidance is an
input), so ``""`` is encoded for true CFG; Qwen-Image's true CFG uses the negative ``" "`` of its model card (its
pipeline guides only when a negative prompt is given); Wan encodes ``""`` as its pipeline does without a negative
prompt (UMT5 states zeroed past each prompt's length); LTX-Video encodes ``""`` with T5 and keeps the attention masks
of both branches; PixArt-Σ and Sana encode ``""`` too, each token with its mask (Sana's prompt behind its complex human
instruction, the negative without it, as ``SanaPipeline`` does); CogVideoX encodes ``""`` with T5, padded to the
transformer's ``max_text_seq_length`` and without a mask, as ``CogVideoXPipeline`` feeds it. Pass
``negative_prompts`` to use other negatives.

Per-sample inputs that are not the prompt (SDXL ``time_ids``, Flux ``guidance``) are identical in both branches, and
so is the first frame of image-to-video teachers (``encode_prompts(..., images=)``, ``first_frame_conditioning``):
Wan 2.1 I2V's condition latents and CLIP image tokens, Wan 2.2 TI2V-5B's clean first latent frame.

Z-Image encodes ``""`` as its pipeline does without a negative prompt; its captions keep their own lengths (the
pipeline passes them as a list), padded here with a mask.

FLUX.2 [dev] has no negative branch either (``Flux2Pipeline`` only embeds its guidance): ``""`` is encoded, as for Flux.
Chroma's true CFG encodes ``""`` as its negative, as ``ChromaPipeline`` does without a negative prompt; both branches
keep their T5 masks (``_chroma``).

HunyuanVideo 1.5 encodes ``""`` as its pipeline does without a negative prompt (its chat template turns it into
``" "``), each branch with both of its token streams and their masks: Qwen2.5-VL's and ByT5's (zero, mask 0, where a
prompt quotes no text).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from fewstep.models.backbones import (
    default_resolution,
    is_hunyuan15_pipeline,
    ltx_rope_interpolation_scale,
    video_defaults,
    video_latent_shape,
)
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher


def class_conditioning(labels: Tensor | list[int], null_class: int) -> tuple[Conditioning, Conditioning]:
    """``(cond, uncond)`` for a class-conditional model: ``labels`` ``[b]`` and the null class repeated."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    return Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, null_class))


def _device(pipeline: Any) -> torch.device:
    """Where the text encoders run (token ids go there); outputs are moved to the backbone afterwards."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return next(module.parameters()).device
    return torch.device("cpu")


def _sd15(pipe: Any, prompts: list[str], negatives: list[str] | None, **_: Any) -> tuple[Conditioning, Conditioning]:
    pe, npe = pipe.encode_prompt(prompts, _device(pipe), 1, True, negative_prompt=negatives)
    return Conditioning(prompt_embeds=pe), Conditioning(prompt_embeds=npe)


def sdxl_time_ids(pipe: Any, resolution: int | tuple[int, int], batch_size: int, dtype: torch.dtype) -> Tensor:
    """SDXL micro-conditioning ``[b, 6]`` = ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` for a
    square side or a ``(height, width)``."""
    size = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    te2 = getattr(pipe, "text_encoder_2", None)
    proj_dim = te2.config.projection_dim if te2 is not None else None
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=proj_dim)
    return ids.repeat(batch_size, 1)


def _sdxl(
    pipe: Any, prompts: list[str], negatives: list[str] | None, resolution: int, **_: Any
) -> tuple[Conditioning, Conditioning]:
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompts, device=_device(pipe), num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negatives,
    )  # fmt: skip
    time_ids = sdxl_time_ids(pipe, resolution, len(prompts), pe.dtype).to(pe.device)
    return (
        Conditioning(prompt_embeds=pe, pooled_prompt_embeds=ppe, time_ids=time_ids),
        Conditioning(prompt_embeds=npe, pooled_prompt_embeds=nppe, time_ids=time_ids),
    )


def _sd3(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=_device(pipe), num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=negatives, max_sequence_length=max_sequence_length or 256,
    )  # fmt: skip
    return (
        Conditioning(prompt_embeds=pe, pooled_prompt_embeds=ppe),
        Conditioning(prompt_embeds=npe, pooled_prompt_embeds=nppe),
    )


def _flux(
    pipe: Any,
    prompts: list[str],
    negatives: list[str] | None,
    max_sequence_length: int | None,
    guidance: float | None,
    **_: Any,
) -> tuple[Conditioning, Conditioning]:
    def enc(texts: list[str]) -> Conditioning:
        pe, ppe, txt_ids = pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=_device(pipe), num_images_per_prompt=1,
            max_sequence_length=max_sequence_length or 512,
        )  # fmt: skip
        return Conditioning(prompt_embeds=pe, pooled_prompt_embeds=ppe, txt_ids=txt_ids)

    cond, uncond = enc(prompts), enc(negatives or [""] * len(prompts))
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        g = torch.full((len(prompts),), 3.5 if guidance is None else float(guidance), dtype=torch.float32)
        cond, uncond = cond.replace(guidance=g), uncond.replace(guidance=g)
    return cond, uncond


FLUX2_DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's guidance_scale default (its embedded guidance)


def _flux2(
    pipe: Any,
    prompts: list[str],
    negatives: list[str] | None,
    max_sequence_length: int | None,
    guidance: float | None,
    **_: Any,
) -> tuple[Conditioning, Conditioning]:
    """Mistral Small 3.1's hidden states after layers 10, 20 and 30, stacked on the features, of the prompt behind
    FLUX.2's system message in the chat template, padded to ``max_sequence_length`` (default 512) and unmasked
    (``Flux2Pipeline.encode_prompt`` with its call defaults). ``Flux2Pipeline`` has no negative branch (its guidance
    is embedded), so ``""`` is encoded for the unconditional one, as for Flux."""
    layers = _call_default(pipe, "text_encoder_out_layers")

    def enc(texts: list[str]) -> Conditioning:
        pe, _ = pipe.encode_prompt(
            prompt=texts, device=_device(pipe), num_images_per_prompt=1,
            max_sequence_length=max_sequence_length or 512, text_encoder_out_layers=layers,
        )  # fmt: skip
        return Conditioning(prompt_embeds=pe)

    cond, uncond = enc(prompts), enc(negatives or [""] * len(prompts))
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        g = torch.full((len(prompts),), FLUX2_DEFAULT_GUIDANCE if guidance is None else float(guidance))
        cond, uncond = cond.replace(guidance=g), uncond.replace(guidance=g)
    return cond, uncond


QWEN_NULL_PROMPT = " "  # Qwen-Image's model card: negative_prompt = " " turns true CFG on with no negative content


def _qwen_image(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """Qwen2.5-VL's last hidden states of the prompt in Qwen-Image's chat template, the template's system turn dropped
    (``QwenImagePipeline.encode_prompt``); each prompt keeps its own length, recorded in ``prompt_embeds_mask``."""

    def enc(texts: list[str]) -> Conditioning:
        pe, mask = pipe.encode_prompt(
            prompt=texts, device=_device(pipe), num_images_per_prompt=1, max_sequence_length=max_sequence_length or 512
        )  # the pipeline's default length
        if mask is None:  # every token real: the pipeline drops the mask
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask.long())

    return enc(prompts), enc(negatives or [QWEN_NULL_PROMPT] * len(prompts))


def _chroma(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """T5 states padded to ``max_sequence_length`` (default 512, the pipeline's) with Chroma's mask: each prompt's
    tokens and its first padding token (``ChromaPipeline.encode_prompt``); the negative branch encodes ``""`` unless
    negatives are given, as the pipeline does."""
    pe, _, mask, npe, _, nmask = pipe.encode_prompt(
        prompt=prompts, negative_prompt=negatives, device=_device(pipe), num_images_per_prompt=1,
        do_classifier_free_guidance=True, max_sequence_length=max_sequence_length or 512,
    )  # fmt: skip
    return (
        Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask.long()),
        Conditioning(prompt_embeds=npe, prompt_embeds_mask=nmask.long()),
    )


def padded_captions(captions: list[Tensor]) -> Conditioning:
    """Caption states of different lengths (``[L_i, d]`` each, Z-Image's list) as one ``prompt_embeds`` ``[b, L, d]``
    padded with zeros and their ``prompt_embeds_mask`` ``[b, L]`` (1 on each caption's own tokens)."""
    length = max(c.shape[0] for c in captions)
    pe = torch.stack([torch.cat([c, c.new_zeros(length - c.shape[0], c.shape[1])]) for c in captions])
    mask = torch.stack([(torch.arange(length) < c.shape[0]).long() for c in captions]).to(pe.device)
    return Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask)


def _zimage(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """Qwen3's second-to-last hidden states of the prompt in its chat template (a user turn, the assistant turn
    opened, thinking enabled), each prompt's padding dropped (``ZImagePipeline.encode_prompt``, default 512 tokens);
    fewstep pads them again with a mask (``padded_captions``) and the adapter unpads. The negative defaults to the
    pipeline's ``""``."""

    def enc(texts: list[str]) -> Conditioning:
        # a copy of the list: the pipeline writes the templated prompts into the list it is given
        captions, _ = pipe.encode_prompt(
            prompt=list(texts), device=_device(pipe), do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or 512,
        )  # fmt: skip
        return padded_captions(captions)

    return enc(prompts), enc(negatives or [""] * len(prompts))


def _wan(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    from diffusers import WanPipeline
    from diffusers.utils import is_ftfy_available

    length = max_sequence_length or 512
    if not isinstance(pipe, WanPipeline) and not is_ftfy_available():
        # WanImageToVideoPipeline (diffusers 0.42) cleans prompts with ftfy even where it is not installed (a
        # NameError); its UMT5 encoding is WanPipeline's, whose cleaning skips ftfy when it is missing.
        def embed(texts: list[str]) -> Tensor:
            return WanPipeline._get_t5_prompt_embeds(pipe, texts, 1, length, _device(pipe))

        negative = embed(negatives or [""] * len(prompts))
        return Conditioning(prompt_embeds=embed(prompts)), Conditioning(prompt_embeds=negative)
    pe, npe = pipe.encode_prompt(
        prompt=prompts, negative_prompt=negatives, do_classifier_free_guidance=True, num_videos_per_prompt=1,
        max_sequence_length=length, device=_device(pipe),
    )  # fmt: skip
    return Conditioning(prompt_embeds=pe), Conditioning(prompt_embeds=npe)


def _ltx(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """T5 states padded to ``max_sequence_length`` (default 128, the pipeline's) with their attention mask, and the
    pipeline's rotary position scale at its default frame rate (``ltx_rope_interpolation_scale``)."""
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompt=prompts, negative_prompt=negatives, do_classifier_free_guidance=True, num_videos_per_prompt=1,
        max_sequence_length=max_sequence_length or 128, device=_device(pipe),
    )  # fmt: skip
    rope = torch.tensor([ltx_rope_interpolation_scale(pipe)], dtype=torch.float32).repeat(len(prompts), 1)
    return (
        Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask.long(), rope_interpolation_scale=rope),
        Conditioning(prompt_embeds=npe, prompt_embeds_mask=nmask.long(), rope_interpolation_scale=rope),
    )


def _cogvideox(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """T5 states padded to ``max_sequence_length`` (default the transformer's ``max_text_seq_length``: CogVideoX's 226,
    the pipeline's default; 2b's sin-cos positions take exactly that many text tokens). No mask: the pipeline's
    transformer attends to the padding too."""
    length = max_sequence_length or int(pipe.transformer.config.max_text_seq_length)
    pe, npe = pipe.encode_prompt(
        prompt=prompts, negative_prompt=negatives, do_classifier_free_guidance=True, num_videos_per_prompt=1,
        max_sequence_length=length, device=_device(pipe),
    )  # fmt: skip
    return Conditioning(prompt_embeds=pe), Conditioning(prompt_embeds=npe)


def _hunyuan15(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    """``HunyuanVideo15Pipeline.encode_prompt``: Qwen2.5-VL's third-to-last hidden states of the prompt behind the
    pipeline's system message in the chat template, the template's first tokens cropped, padded to
    ``max_sequence_length`` (default the pipeline's ``tokenizer_max_length``, 1000) with their mask; and ByT5's states
    of the text the prompt quotes (``"…"``), padded to 256 with their mask (zero where it quotes none)."""

    def enc(texts: list[str]) -> Conditioning:
        qwen = qwen_mask = None
        if max_sequence_length is not None:  # the pipeline's own Qwen encoding at another length
            qwen, qwen_mask = pipe._get_mllm_prompt_embeds(
                pipe.text_encoder, pipe.tokenizer, texts, _device(pipe), max_sequence_length,
                system_message=pipe.system_message, crop_start=pipe.prompt_template_encode_start_idx,
            )  # fmt: skip
        pe, mask, pe2, mask2 = pipe.encode_prompt(
            prompt=texts, device=_device(pipe), batch_size=len(texts), num_videos_per_prompt=1, prompt_embeds=qwen,
            prompt_embeds_mask=qwen_mask,
        )  # fmt: skip
        return Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask.long(), prompt_embeds_2=pe2,
                            prompt_embeds_mask_2=mask2.long())  # fmt: skip

    return enc(prompts), enc(negatives or [""] * len(prompts))


def _caption_cleaning(default: bool) -> bool:
    """The pipeline's ``clean_caption`` default where it can clean (it needs ``bs4`` and ``ftfy``; without them the
    pipeline warns and encodes the raw caption, which is what ``False`` does without the warning)."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return default and is_bs4_available() and is_ftfy_available()


def _call_default(pipe: Any, name: str) -> Any:
    """A keyword default of the pipeline's ``__call__`` (Sana's complex human instruction, PixArt's caption cleaning),
    read from its signature so the text matches the installed diffusers."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _masked_t5_or_gemma(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **extra: Any
) -> tuple[Conditioning, Conditioning]:
    """PixArt-Σ (T5) and Sana (Gemma 2): ``encode_prompt`` gives embeddings and attention masks, both padded to
    ``max_sequence_length`` (default 300, the pipelines')."""
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompts, True, negative_prompt=negatives or "", num_images_per_prompt=1, device=_device(pipe),
        max_sequence_length=max_sequence_length or 300, **extra,
    )  # fmt: skip
    return (
        Conditioning(prompt_embeds=pe, prompt_embeds_mask=mask.long()),
        Conditioning(prompt_embeds=npe, prompt_embeds_mask=nmask.long()),
    )


def _pixart_sigma(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    clean = _caption_cleaning(_call_default(pipe, "clean_caption"))
    return _masked_t5_or_gemma(pipe, prompts, negatives, max_sequence_length, clean_caption=clean)


def _sana(
    pipe: Any, prompts: list[str], negatives: list[str] | None, max_sequence_length: int | None, **_: Any
) -> tuple[Conditioning, Conditioning]:
    clean = _caption_cleaning(_call_default(pipe, "clean_caption"))
    instruction = _call_default(pipe, "complex_human_instruction")
    return _masked_t5_or_gemma(pipe, prompts, negatives, max_sequence_length, clean_caption=clean,
                               complex_human_instruction=instruction)  # fmt: skip


_ENCODERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "sd35": _sd3, "qwen_image": _qwen_image,
             "wan21": _wan, "wan21_i2v": _wan, "wan22": _wan, "wan22_ti2v": _wan, "ltx": _ltx,
             "pixart_sigma": _pixart_sigma, "sana": _sana, "cogvideox": _cogvideox,
             "flux2": _flux2, "chroma": _chroma, "zimage": _zimage, "hunyuan15": _hunyuan15,
             "hunyuan15_i2v": _hunyuan15}  # fmt: skip
# families that take a first frame: encode_prompts(..., images=)
IMAGE_TO_VIDEO_FAMILIES = ("wan21_i2v", "wan22_ti2v", "hunyuan15_i2v")
FIRST_FRAME_REQUIRED = ("wan21_i2v", "hunyuan15_i2v")  # ... and those that need one (TI2V-5B without one is t2v)


def as_pil_images(images: Any) -> list[Any]:
    """First frames as a list of PIL images: PIL images as they are, a tensor ``[b, 3, H, W]`` in ``[-1, 1]``
    quantised to 8 bits per channel (as an image file of it would be), so the pipeline's own preprocessing applies."""
    if isinstance(images, Tensor):
        from diffusers.image_processor import VaeImageProcessor

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"First frames as a tensor are [b, 3, H, W] in [-1, 1]; got shape {tuple(images.shape)}.")
        pixels = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
        return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels))
    return list(images) if isinstance(images, list | tuple) else [images]


def first_frame_conditioning(
    pipeline: Any, images: Any, num_frames: int | None = None, resolution: int | tuple[int, int] | None = None
) -> Conditioning:
    """The first-frame fields of ``Conditioning``, one row per image, exactly as ``WanImageToVideoPipeline`` computes
    them for a clip of ``num_frames`` at ``resolution`` (default: the pipeline's, ``video_defaults``), with its own
    ``prepare_latents`` (the noise it would draw is not):

    * Wan 2.1 I2V: ``image_embeds``, the CLIP vision tower's penultimate states of the image (``encode_image``), and
      ``condition_latents``, the frame mask and the VAE latents of the image followed by zero frames;
    * Wan 2.2 TI2V-5B (``expand_timesteps``): ``first_frame_latents``, the VAE latents of the image alone (one latent
      frame), which the ``wan_ti2v`` adapter keeps clean;
    * HunyuanVideo 1.5 image-to-video: ``condition_latents`` and ``image_embeds`` as
      ``HunyuanVideo15ImageToVideoPipeline`` makes them (``hunyuan15_first_frame``).

    Args:
        pipeline: a ``WanImageToVideoPipeline``, or TI2V-5B's ``WanPipeline`` (the same preparation applies).
        images: PIL images or a tensor ``[b, 3, H, W]`` in ``[-1, 1]`` (``as_pil_images``), resized to the clip's size.
    """
    from diffusers import WanImageToVideoPipeline

    frames, height, width = video_defaults(pipeline)
    frames = num_frames or frames
    if resolution is not None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    pil = as_pil_images(images)
    if is_hunyuan15_pipeline(pipeline):
        with torch.no_grad():
            return Conditioning.cat([hunyuan15_first_frame(pipeline, image, frames, height, width) for image in pil])
    device = _device(pipeline)
    expand = bool(pipeline.config.get("expand_timesteps"))
    shape = video_latent_shape(pipeline, 1, (height, width), frames)
    rows = []
    with torch.no_grad():
        for image in pil:  # prepare_latents repeats one image's latents over its batch: one image at a time
            pixels = pipeline.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
            prepared = WanImageToVideoPipeline.prepare_latents(
                pipeline, pixels, 1, shape[1], height, width, frames, torch.float32, device, None, torch.zeros(shape)
            )  # fmt: skip
            rows.append(prepared[1])  # Wan 2.1: [1, 4 + c, f, h, w]; TI2V: [1, c, 1, h, w]
        if expand:
            return Conditioning(first_frame_latents=torch.cat(rows))
        embeds = pipeline.encode_image(pil, device)  # [b, n, d]
    return Conditioning(condition_latents=torch.cat(rows), image_embeds=embeds)


def hunyuan15_first_frame(pipeline: Any, image: Any, num_frames: int, height: int, width: int) -> Conditioning:
    """One first frame as ``HunyuanVideo15ImageToVideoPipeline`` conditions on it, for a clip of ``num_frames`` at
    ``height × width`` (a batch of 1): the image resized and center-cropped to the clip (``resize_mode="crop"``), its
    VAE latents times ``scaling_factor`` on the first latent frame and zeros after it, followed by the mask (1 on the
    first frame) on the channels (``condition_latents`` ``[1, c + 1, f, h, w]``, ``prepare_cond_latents_and_mask``),
    and SigLIP's last hidden states of it (``image_embeds``, ``_get_image_embeds``). The pipeline itself picks the
    clip's size from the image's aspect ratio: give images of the size the clips are trained at."""
    image = pipeline.video_processor.resize(image, height=height, width=width, resize_mode="crop")
    device = _device(pipeline)
    latents = type(pipeline)._get_image_latents(pipeline.vae, pipeline.video_processor, image, height, width, device)
    shape = video_latent_shape(pipeline, 1, (height, width), num_frames)  # [1, c, f, h, w]
    condition = latents.new_zeros(1, shape[1] + 1, *shape[2:])
    condition[:, : shape[1], :1] = latents  # the first frame's latents, zero frames after it
    condition[:, shape[1], 0] = 1.0  # the mask: the first latent frame is given
    embeds = type(pipeline)._get_image_embeds(pipeline.image_encoder, pipeline.feature_extractor, image, device)
    return Conditioning(condition_latents=condition.float(), image_embeds=embeds.float())


def encode_with_pipeline(
    pipeline: Any,
    family: str,
    prompts: list[str],
    negative_prompts: list[str] | None = None,
    resolution: int | tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    guidance: float | None = None,
    images: Any = None,
    num_frames: int | None = None,
) -> tuple[Conditioning, Conditioning]:
    """``encode_prompts`` on a bare pipeline (used before a ``Teacher`` exists). See ``encode_prompts``."""
    if family not in _ENCODERS:
        raise ValueError(
            f"Prompt encoding is for text-conditioned families ({', '.join(_ENCODERS)}); got {family!r}. "
            "Class-conditional models use fewstep.models.prompts.class_conditioning(labels, null_class)."
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"Got {len(negative_prompts)} negative prompts for {len(prompts)} prompts; pass one each.")
    if images is not None and family not in IMAGE_TO_VIDEO_FAMILIES:
        raise ValueError(f"images= is for image-to-video families ({', '.join(IMAGE_TO_VIDEO_FAMILIES)}); "
                         f"the {family} teacher takes none.")  # fmt: skip
    with torch.no_grad():
        cond, uncond = _ENCODERS[family](
            pipeline, prompts, negative_prompts, resolution=resolution or default_resolution(pipeline),
            max_sequence_length=max_sequence_length, guidance=guidance,
        )  # fmt: skip
    if images is None:
        return cond, uncond
    image = first_frame_conditioning(pipeline, images, num_frames, resolution)
    if image.batch_size not in (1, len(prompts)):
        raise ValueError(f"Got {image.batch_size} first frames for {len(prompts)} prompts; pass one, or one each.")
    image = image.repeat(len(prompts)) if image.batch_size == 1 else image
    image = image.to(cond.prompt_embeds.device)
    return cond.with_image_of(image), uncond.with_image_of(image)  # the pipelines' negative branch sees the image too


def encode_prompts(
    teacher: Teacher,
    prompts: list[str],
    negative_prompts: list[str] | None = None,
    resolution: int | tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    guidance: float | None = None,
    images: Any = None,
    num_frames: int | None = None,
) -> tuple[Conditioning, Conditioning]:
    """Encode prompts with the teacher pipeline's own text encoders (and, for image-to-video, its first frames).

    Args:
        teacher: a teacher from ``load_teacher`` (``teacher.pipeline`` holds the encoders).
        prompts: ``b`` prompts.
        negative_prompts: optional ``b`` negatives; default is the pipeline's own null (see the module docstring).
        resolution: image size for SDXL's ``time_ids`` (default: the pipeline's default resolution); for a first
            frame, the clip's side or ``(height, width)``.
        max_sequence_length: T5 tokens for SD3 (default 256), Flux and Wan (default 512), LTX-Video (default 128),
            Mistral tokens for FLUX.2 (default 512), PixArt-Σ (default 300), CogVideoX (default the transformer's
            ``max_text_seq_length``, 226), Qwen2.5-VL tokens for Qwen-Image (default 512) and HunyuanVideo 1.5
            (default 1000, after its template), Gemma tokens for Sana (default 300), Qwen3 tokens for Z-Image
            (default 512), as the pipelines use; T5 tokens for Chroma (default 512).
        guidance: Flux and FLUX.2 embedded guidance; default the teacher's (``null_cond.guidance``), else 3.5 (Flux)
            or 4.0 (FLUX.2).
        images: image-to-video teachers (``IMAGE_TO_VIDEO_FAMILIES``; required by ``FIRST_FRAME_REQUIRED``, Wan 2.1
            I2V): the first frame of each clip, one for all prompts or one each (``first_frame_conditioning``); both
            branches get it. Wan 2.2 TI2V-5B without images is text-to-video.
        num_frames: the clip length the first-frame conditioning is built for (default: the pipeline's); with
            ``resolution`` (a side or ``(height, width)``) it must match the latents sampled.

    Returns:
        ``(cond, uncond)``, each batched ``[b, ...]``, on the device of the teacher's backbone.
    """
    if teacher.pipeline is None:
        raise ValueError("This teacher has no pipeline (a custom module); build its Conditioning yourself.")
    if images is None and teacher.family in FIRST_FRAME_REQUIRED:
        raise ValueError(
            f"The {teacher.family} teacher generates each clip from its first frame: pass images= (PIL images or a "
            "[b, 3, H, W] tensor in [-1, 1], one for all prompts or one each) to encode_prompts."
        )
    if guidance is None and teacher.null_cond is not None and teacher.null_cond.guidance is not None:
        guidance = float(teacher.null_cond.guidance.reshape(-1)[0])
    cond, uncond = encode_with_pipeline(
        teacher.pipeline, teacher.family, prompts, negative_prompts, resolution, max_sequence_length, guidance, images,
        num_frames,
    )  # fmt: skip
    device = next(teacher.denoiser.backbone.parameters()).device
    return cond.to(device), uncond.to(device)


def null_conditioning(
    pipeline: Any, family: str, guidance: float | None = None, resolution: int | None = None
) -> Conditioning:
    """The unconditional input for one sample (batch 1): the pipeline's encoding of the null prompt ``""``."""
    _, uncond = encode_with_pipeline(pipeline, family, [""], resolution=resolution, guidance=guidance)
    return uncond
