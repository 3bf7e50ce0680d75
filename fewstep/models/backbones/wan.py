"""Wan 2.1 / 2.2: text-to-video, image-to-video (condition channels and CLIP image tokens), TI2V-5B (the first
frame's latents kept clean), the class-conditional pixel teacher of the video benchmark and Wan 2.2 A14B's two
experts switched at the pipeline's boundary."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models.backbones.common import (
    BACKBONES,
    cast_like,
    require_field,
)
from fewstep.models.conditioning import Conditioning


@BACKBONES.register("wan")
def wan_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``WanTransformer3DModel`` on video latents ``[b, c, f, h, w]``: the timestep is ``1000·s``
    (``FlowSchedule(timestep_scale=1000)``), the text is UMT5's ``prompt_embeds`` as ``WanPipeline`` pads them.

    Inputs are cast to the patch embedding's dtype: Wan keeps some parameters in float32 in a bf16 model (its
    ``_keep_in_fp32_modules``, among them the first parameter, ``scale_shift_table``)."""
    x = x.to(backbone.patch_embedding.weight.dtype)
    return backbone(
        hidden_states=wan_input(backbone, x, cond),
        timestep=timestep,
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Wan"), x),
        encoder_hidden_states_image=wan_image_embeds(backbone, x, cond),
        return_dict=False,
    )[0]


@BACKBONES.register("wan_class")
def wan_class_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """A class-conditional ``WanTransformer3DModel`` on pixel clips ``[b, c, f, h, w]`` (the moving-digits video
    teacher): its one text token is the one-hot class label over ``text_dim`` classes, the last being the null class
    of classifier-free guidance. The text projection turns it into a learned class embedding."""
    labels = require_field(cond.class_labels, "class_labels", "class-conditional Wan").to(x.device).long().reshape(-1)
    if labels.numel() == 1 and x.shape[0] > 1:
        labels = labels.expand(x.shape[0])
    tokens = torch.nn.functional.one_hot(labels, backbone.config.text_dim).to(x.dtype)[:, None, :]
    return backbone(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens, return_dict=False)[0]


I2V_HINT = "Encode the first frames with fewstep.models.prompts.encode_prompts(teacher, prompts, images=...)."


def wan_input(backbone: nn.Module, x: Tensor, cond: Conditioning) -> Tensor:
    """What a Wan transformer takes as ``hidden_states``: the noisy latents ``[b, c, f, h, w]``, for Wan 2.1 I2V
    (``in_channels = 36``) followed on the channels by ``cond.condition_latents`` (the frame mask and the first
    frame's latents, ``WanImageToVideoPipeline``'s ``condition``)."""
    if cond.condition_latents is not None:
        x = torch.cat([x, cast_like(cond.condition_latents, x)], dim=1)  # [b, c + 4 + c, f, h, w]
    if x.shape[1] != backbone.config.in_channels:
        raise ValueError(
            f"This Wan transformer takes {backbone.config.in_channels} input channels but got {x.shape[1]}: an "
            f"image-to-video model needs `cond.condition_latents` (the first frame). {I2V_HINT}"
        )
    return x


def wan_image_embeds(backbone: nn.Module, x: Tensor, cond: Conditioning) -> Tensor | None:
    """Wan 2.1 I2V's CLIP image tokens (``cond.image_embeds``), required where the transformer has an ``image_dim``;
    ``None`` for text-to-video."""
    if getattr(backbone.config, "image_dim", None) is None:
        return None
    if cond.image_embeds is None:
        raise ValueError(f"This Wan image-to-video transformer needs `cond.image_embeds` (CLIP tokens). {I2V_HINT}")
    return cast_like(cond.image_embeds, x)


WAN_TIMESTEP_SCALE = 1000.0  # a Wan transformer's timestep is 1000·s (FlowSchedule(timestep_scale=1000))


@BACKBONES.register("wan_ti2v")
def wan_ti2v_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """Wan 2.2 TI2V-5B (``expand_timesteps``) on video latents ``[b, c, f, h, w]``.

    Text-to-video: as ``wan`` (``WanPipeline`` feeds the same timestep to every token). Image-to-video, as
    ``WanImageToVideoPipeline`` with ``expand_timesteps``: the first latent frame is replaced by
    ``cond.first_frame_latents`` and its tokens get timestep 0, the others ``timestep`` (one per token, ``[b, f·(h/2)·
    (w/2)]``). The pipeline overwrites that frame after every step; here its velocity is instead set to ``(x − x_img) /
    s``, so the flow prediction ``x̂0 = x − s·v`` of the first frame is the given frame itself: every sampler and
    objective sees a clean first frame (and no gradient through it), and sampling ends on it as the pipeline does.
    """
    first = cond.first_frame_latents
    if first is None:
        return wan_adapter(backbone, x, timestep, cond)
    x = x.to(backbone.patch_embedding.weight.dtype)
    first = cast_like(first, x)
    p_t, p_h, p_w = backbone.config.patch_size
    b, _, f, h, w = x.shape
    moving = torch.ones(b, f // p_t, h // p_h, w // p_w, device=x.device)  # [b, f', h', w'] tokens; 0: first frame
    moving[:, : first.shape[2] // p_t] = 0
    out = backbone(
        hidden_states=torch.cat([first, x[:, :, first.shape[2] :]], dim=2),
        timestep=(moving * timestep.float().view(-1, 1, 1, 1)).flatten(1),  # [b, tokens], float32 as the pipeline's
        encoder_hidden_states=cast_like(require_field(cond.prompt_embeds, "prompt_embeds", "Wan"), x),
        return_dict=False,
    )[0]
    n = first.shape[2]
    s = (timestep.float() / WAN_TIMESTEP_SCALE).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
    v_first = (x[:, :, :n].float() - first.float()) / s  # x̂0 = x − s·v = x_img
    return torch.cat([v_first, out[:, :, n:].float()], dim=2)


WAN_EXPERT_COMPONENTS: dict[str, str] = {"transformer": "high", "transformer_2": "low"}  # pipeline component: expert


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one backbone: ``high`` (the pipeline's ``transformer``) denoises timesteps at or above
    ``boundary_timestep = boundary_ratio · num_train_timesteps``, ``low`` (``transformer_2``) those below, as
    ``WanPipeline`` switches them. ``config`` is the high-noise expert's (both share their shapes).

    Args:
        high: the high-noise expert (``pipe.transformer``).
        low: the low-noise expert (``pipe.transformer_2``).
        boundary_timestep: the switch, in the backbone's timestep units (Wan 2.2 T2V-A14B: 0.875 · 1000).
    """

    _supports_gradient_checkpointing = True  # each expert checkpoints its own blocks

    def __init__(self, high: nn.Module, low: nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        self.high, self.low = high, low
        self.boundary_timestep = float(boundary_timestep)

    @property
    def config(self) -> Any:
        return self.high.config

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Any = None) -> None:
        """diffusers' per-block gradient checkpointing on both experts, with the same checkpoint function."""
        for expert in (self.high, self.low):
            expert.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> WanExperts:
        """The experts of a Wan 2.2 ``WanPipeline`` (``transformer``, ``transformer_2``, ``boundary_ratio``)."""
        ratio = pipeline.config.boundary_ratio
        return cls(pipeline.transformer, pipeline.transformer_2, ratio * pipeline.scheduler.config.num_train_timesteps)


def is_wan_experts_pipeline(pipeline: Any) -> bool:
    """Whether a pipeline is Wan 2.2 with two experts (a ``transformer_2`` and a ``boundary_ratio``)."""
    config = getattr(pipeline, "config", {})
    return getattr(pipeline, "transformer_2", None) is not None and config.get("boundary_ratio") is not None


def is_wan_image_pipeline(pipeline: Any) -> bool:
    """Whether a Wan pipeline generates from a first frame (``WanImageToVideoPipeline``: it registers an
    ``image_encoder``, loaded or not)."""
    return "image_encoder" in getattr(pipeline, "config", {})


@BACKBONES.register("wan_experts")
def wan_experts_adapter(backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
    """``WanExperts``: each sample goes to the expert of its timestep (``≥ boundary``: high-noise, else low-noise);
    a batch on both sides of the boundary runs both experts, each on its own samples."""
    high = timestep >= backbone.boundary_timestep  # [b] bool, as WanPipeline's `t >= boundary_timestep`
    if bool(high.all()):
        return wan_adapter(backbone.high, x, timestep, cond)
    if not bool(high.any()):
        return wan_adapter(backbone.low, x, timestep, cond)
    idx_high, idx_low = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
    out_high = wan_adapter(backbone.high, x[idx_high], timestep[idx_high], cond.index(idx_high))
    out_low = wan_adapter(backbone.low, x[idx_low], timestep[idx_low], cond.index(idx_low))
    out = out_high.new_empty((x.shape[0], *out_high.shape[1:]))
    out[idx_high], out[idx_low] = out_high, out_low
    return out
