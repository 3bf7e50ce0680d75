"""What a denoiser is conditioned on, as one batched container.

Fields are optional; each backbone adapter reads the ones its model takes. Batched fields have the batch as their
first dimension; ``txt_ids``/``img_ids`` (Flux) and ``extra`` entries named in ``unbatched`` are shared.
``IMAGE_FIELDS`` (image-to-video) belong to the sample, not to its prompt: the unconditional branch keeps them.
Prompt encoding with a pipeline's own encoders lives in ``fewstep.models.prompts``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

UNBATCHED_FIELDS = ("txt_ids", "img_ids")  # shared by every sample of a batch (not indexed by it)
IMAGE_FIELDS = ("condition_latents", "image_embeds", "first_frame_latents")  # the first frame: in both CFG branches


@dataclass
class Conditioning:
    prompt_embeds: Tensor | None = None  # [b, L, D] text tokens (SD1.5/SDXL/SD3/Flux)
    pooled_prompt_embeds: Tensor | None = None  # [b, D] (SDXL text_embeds, SD3/Flux pooled)
    time_ids: Tensor | None = None  # [b, 6] SDXL micro-conditioning
    class_labels: Tensor | None = None  # [b] long, class-conditional models (null class for CFG)
    guidance: Tensor | None = None  # [b] guidance-embedding input (Flux-dev style distilled guidance)
    timestep_cond: Tensor | None = None  # [b, d] LCM guidance-scale embedding
    txt_ids: Tensor | None = None  # [L, 3] Flux, shared across the batch
    img_ids: Tensor | None = None  # [h·w, 3] Flux, shared across the batch
    prompt_embeds_mask: Tensor | None = None  # [b, L] long, 1 = a real text token (Qwen-Image: lengths differ)
    rope_interpolation_scale: Tensor | None = None  # [b, 3] LTX-Video: (temporal compression / fps, spatial, spatial)
    prompt_embeds_2: Tensor | None = None  # [b, L2, D2] a second text stream (HunyuanVideo 1.5: ByT5 glyph tokens)
    prompt_embeds_mask_2: Tensor | None = None  # [b, L2] long, 1 = a real token of prompt_embeds_2
    # Image-to-video: the first frame, identical in the conditional and the unconditional branch (as the pipelines)
    condition_latents: Tensor | None = None  # [b, 4 + c, f, h, w] Wan 2.1 I2V: frame mask + VAE latents of the first
    #                                          frame and zero frames, concatenated to the noisy latents' channels
    image_embeds: Tensor | None = None  # [b, n, d] Wan 2.1 I2V: CLIP vision tokens of the first frame
    first_frame_latents: Tensor | None = None  # [b, c, 1, h, w] Wan 2.2 TI2V: the first latent frame, kept clean
    extra: dict[str, Any] = field(default_factory=dict)  # custom teachers: passed through as keyword arguments

    def _map(self, fn_batched: Any, fn_shared: Any = None) -> Conditioning:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":
                out["extra"] = {k: fn_batched(t) if isinstance(t, Tensor) else t for k, t in v.items()}
            elif v is None:
                out[f.name] = None
            elif f.name in UNBATCHED_FIELDS:
                out[f.name] = fn_shared(v) if fn_shared else v
            else:
                out[f.name] = fn_batched(v)
        return Conditioning(**out)

    @property
    def batch_size(self) -> int | None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and f.name not in UNBATCHED_FIELDS:
                return v.shape[0]
        return None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to a device; floating tensors also to ``dtype`` (labels and ids keep theirs)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return self._map(move, move)

    def index(self, idx: Tensor | slice | int) -> Conditioning:
        return self._map(lambda t: t[idx])

    def repeat(self, n: int) -> Conditioning:
        """Repeat every batched field ``n`` times along the batch (``repeat_interleave``)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach(), lambda t: t.detach())

    def replace(self, **changes: Any) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def with_image_of(self, other: Conditioning) -> Conditioning:
        """This conditioning with ``other``'s first-frame fields (``IMAGE_FIELDS``): the unconditional branch of an
        image-to-video model sees the same image as the conditional one."""
        return self.replace(**{name: getattr(other, name) for name in IMAGE_FIELDS})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (e.g. ``[uncond, cond]`` for one 2B CFG forward)."""
        items = pad_prompts(items)
        first = items[0]
        out: dict[str, Any] = {}
        for f in dataclasses.fields(first):
            vals = [getattr(c, f.name) for c in items]
            if f.name == "extra":
                out["extra"] = {
                    k: torch.cat([c.extra[k] for c in items]) if isinstance(v, Tensor) else v
                    for k, v in first.extra.items()
                }
            elif all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"Cannot batch conditionings where only some have {f.name!r}.")
            elif f.name in UNBATCHED_FIELDS:
                out[f.name] = vals[0]
            else:
                out[f.name] = torch.cat(vals)
        return Conditioning(**out)


def pad_prompts(items: list[Conditioning]) -> list[Conditioning]:
    """Bring masked text tokens (``prompt_embeds_mask``) of several conditionings to one length: zero embeddings with
    mask 0 are appended, which the backbone does not attend to (a prompt of 12 tokens next to a negative of 5)."""
    masked = [c for c in items if c.prompt_embeds_mask is not None and c.prompt_embeds is not None]
    if len(masked) < 2:
        return items
    length = max(c.prompt_embeds.shape[1] for c in masked)

    def pad(c: Conditioning) -> Conditioning:
        extra = length - c.prompt_embeds.shape[1]
        if c.prompt_embeds_mask is None or extra == 0:
            return c
        pe, mask = c.prompt_embeds, c.prompt_embeds_mask
        return c.replace(
            prompt_embeds=torch.cat([pe, pe.new_zeros(pe.shape[0], extra, *pe.shape[2:])], 1),
            prompt_embeds_mask=torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1),
        )

    return [pad(c) for c in items]
