"""Activation memory of a training step, from coefficients measured on the tiny models and block sizes read off a
meta-device forward of the real backbone.

A backbone is a chain of blocks (``BLOCK_CLASSES``: ResNet blocks, transformer blocks, attention layers, resamplers;
the outermost one counts). What one forward with gradients keeps for its backward grows with each block's output: a
block of class ``C`` whose output holds ``n`` elements per sample, ``w`` wide, keeps about
``COEFFICIENTS[backbone][mode][C] · n + COEFFICIENTS[backbone][mode][C + "/text"] · text_tokens · w`` bytes (the
second term: a cross-attention's keys and values of the prompt, which do not grow with the image). Everything outside
the blocks (embeddings, in/out projections) keeps ``rest`` bytes per element of an average block output. While a block
runs its backward (or, with activation checkpointing, its recomputation) the working memory on top is ``transient``
times the largest block's non-checkpointed bytes; a forward without gradients (a teacher's) needs ``forward`` times it.

The real model's blocks and their output sizes come from one forward on the meta device at the recipe's shape (no
memory, a second or two), so UNet levels, joint text+image token streams and video latents are read off the model
itself rather than derived from its config. ``scripts/bench/plan_coefficients.py`` measures the coefficients on the
tiny model of each family at two resolutions (a rank-4 LoRA on every default target, exact CPU tensor bytes with
``fewstep.plan.measure``) and rewrites the table between the markers below.

Modes: ``fp32``, or ``bf16`` (bf16/fp16 mixed precision or a half-precision teacher: measured under CPU bf16
autocast), each with ``+ckpt`` for activation checkpointing (diffusers' ``enable_gradient_checkpointing``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fewstep.plan.inputs import TrainingShape, backbone_forward

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe

BLOCK_CLASSES = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "WanTransformerBlock",
    "QwenImageTransformerBlock",
    "LTXVideoTransformerBlock",
    "Attention",  # a bare attention layer outside a transformer block (UNet2DModel, mid blocks)
    "Downsample2D",
    "Upsample2D",
)

# coefficients:start (written by scripts/bench/plan_coefficients.py)
MEASURED = (
    "2026-12-03, torch 2.13.0: tiny models, rank-4 LoRA, batch 2, two resolutions each, exact CPU tensor "
    "bytes (scripts/bench/plan_coefficients.py)"
)
COEFFICIENTS: dict[str, dict[str, dict[str, float]]] = {
    "UNet2DModel": {
        "fp32": {
            "Attention": 34.25,
            "Downsample2D": 4.5,
            "ResnetBlock2D": 30.114,
            "Upsample2D": 8.25,
            "rest": 21.721,
            "transient": 0.296,
            "forward": 1.253,
        },
        "fp32+ckpt": {
            "Attention": 34.25,
            "Downsample2D": 4.5,
            "ResnetBlock2D": 5.864,
            "Upsample2D": 8.25,
            "rest": 27.487,
            "transient": 1.293,
            "forward": 1.253,
        },
        "bf16": {
            "Attention": 19.25,
            "Downsample2D": 10.25,
            "ResnetBlock2D": 22.511,
            "Upsample2D": 6.125,
            "rest": 10.874,
            "transient": 0.341,
            "forward": 1.158,
        },
        "bf16+ckpt": {
            "Attention": 19.25,
            "Downsample2D": 10.25,
            "ResnetBlock2D": 3.295,
            "Upsample2D": 6.125,
            "rest": 13.769,
            "transient": 1.123,
            "forward": 1.158,
        },
    },
    "UNet2DConditionModel": {
        "fp32": {
            "BasicTransformerBlock": 118.75,
            "BasicTransformerBlock/text": 9.0,
            "Downsample2D": 5.0,
            "ResnetBlock2D": 30.409,
            "Upsample2D": 8.5,
            "rest": 63.186,
            "transient": 0.229,
            "forward": 1.189,
        },
        "fp32+ckpt": {
            "BasicTransformerBlock": 4.0,
            "Downsample2D": 5.0,
            "ResnetBlock2D": 5.909,
            "Upsample2D": 8.5,
            "rest": 68.936,
            "transient": 0.951,
            "forward": 1.189,
        },
        "bf16": {
            "BasicTransformerBlock": 68.75,
            "BasicTransformerBlock/text": 17.539,
            "Downsample2D": 10.5,
            "ResnetBlock2D": 22.659,
            "Upsample2D": 6.25,
            "rest": 43.321,
            "transient": 0.397,
            "forward": 1.151,
        },
        "bf16+ckpt": {
            "BasicTransformerBlock": 2.0,
            "BasicTransformerBlock/text": 1.558,
            "Downsample2D": 10.5,
            "ResnetBlock2D": 3.318,
            "Upsample2D": 6.25,
            "rest": 46.196,
            "transient": 1.188,
            "forward": 1.151,
        },
    },
    "SD3Transformer2DModel": {
        "fp32": {
            "JointTransformerBlock": 71.875,
            "JointTransformerBlock/text": 11.201,
            "rest": 1.373,
            "transient": 0.179,
            "forward": 0.626,
        },
        "fp32+ckpt": {
            "JointTransformerBlock": 4.0,
            "rest": 6.959,
            "transient": 1.161,
            "forward": 0.626,
        },
        "bf16": {
            "JointTransformerBlock": 40.188,
            "JointTransformerBlock/text": 9.671,
            "rest": 0.724,
            "transient": 0.379,
            "forward": 0.689,
        },
        "bf16+ckpt": {
            "JointTransformerBlock": 2.0,
            "JointTransformerBlock/text": 0.36,
            "rest": 3.517,
            "transient": 1.459,
            "forward": 0.689,
        },
    },
    "FluxTransformer2DModel": {
        "fp32": {
            "FluxSingleTransformerBlock": 54.5,
            "FluxSingleTransformerBlock/text": 0.031,
            "FluxTransformerBlock": 80.0,
            "FluxTransformerBlock/text": 0.109,
            "rest": 0.0,
            "transient": 0.55,
            "forward": 0.796,
        },
        "fp32+ckpt": {
            "FluxSingleTransformerBlock": 4.0,
            "FluxTransformerBlock": 4.0,
            "rest": 7.505,
            "transient": 1.127,
            "forward": 0.796,
        },
        "bf16": {
            "FluxSingleTransformerBlock": 35.625,
            "FluxSingleTransformerBlock/text": 0.812,
            "FluxTransformerBlock": 48.375,
            "FluxTransformerBlock/text": 1.461,
            "rest": 0.762,
            "transient": 0.513,
            "forward": 0.774,
        },
        "bf16+ckpt": {
            "FluxSingleTransformerBlock": 2.0,
            "FluxSingleTransformerBlock/text": 0.047,
            "FluxTransformerBlock": 2.0,
            "FluxTransformerBlock/text": 0.281,
            "rest": 4.763,
            "transient": 1.292,
            "forward": 0.774,
        },
    },
    "WanTransformer3DModel": {
        "fp32": {
            "WanTransformerBlock": 71.25,
            "WanTransformerBlock/text": 13.184,
            "rest": 14.938,
            "transient": 0.198,
            "forward": 0.713,
        },
        "fp32+ckpt": {
            "WanTransformerBlock": 4.0,
            "rest": 19.062,
            "transient": 1.161,
            "forward": 0.713,
        },
        "bf16": {
            "WanTransformerBlock": 56.375,
            "WanTransformerBlock/text": 13.426,
            "rest": 3.354,
            "transient": 0.305,
            "forward": 0.647,
        },
        "bf16+ckpt": {
            "WanTransformerBlock": 2.0,
            "WanTransformerBlock/text": 0.125,
            "rest": 12.75,
            "transient": 1.28,
            "forward": 0.647,
        },
    },
    "QwenImageTransformer2DModel": {
        "fp32": {
            "QwenImageTransformerBlock": 59.25,
            "QwenImageTransformerBlock/text": 0.117,
            "rest": 0.0,
            "transient": 0.776,
            "forward": 0.882,
        },
        "fp32+ckpt": {
            "QwenImageTransformerBlock": 4.0,
            "rest": 2.448,
            "transient": 1.464,
            "forward": 0.882,
        },
        "bf16": {
            "QwenImageTransformerBlock": 42.0,
            "QwenImageTransformerBlock/text": 1.496,
            "rest": 0.0,
            "transient": 0.692,
            "forward": 0.878,
        },
        "bf16+ckpt": {
            "QwenImageTransformerBlock": 2.0,
            "QwenImageTransformerBlock/text": 0.125,
            "rest": 1.422,
            "transient": 1.466,
            "forward": 0.878,
        },
    },
}
# coefficients:end


def output_size(output: Any) -> tuple[int, int]:
    """``(elements per sample, width)`` of a block's tensor outputs: a tuple of streams counts each; the width is the
    first output's feature size (``[b, tokens, width]`` or ``[b, channels, ...]``)."""
    tensors = [o for o in (output if isinstance(output, tuple | list) else (output,)) if isinstance(o, Tensor)]
    tensors = [t for t in tensors if t.ndim > 1]
    if not tensors:
        return 0, 0
    first = tensors[0]
    return sum(t[0].numel() for t in tensors), int(first.shape[-1] if first.ndim == 3 else first.shape[1])


@contextmanager
def block_hooks(
    backbone: nn.Module, on_enter: Callable[[nn.Module], None], on_exit: Callable[[nn.Module, tuple[int, int]], None]
) -> Iterator[None]:
    """Call ``on_enter(block)`` before and ``on_exit(block, output_size(output))`` after each outermost
    block's forward while the context is open (nested blocks are part of their outer block). Recomputations during a
    backward (activation checkpointing, which may stop a block half-way) are not reported."""
    depth = [0]

    def in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def pre(module: nn.Module, args: Any) -> None:
        if in_backward():
            return
        depth[0] += 1
        if depth[0] == 1:
            on_enter(module)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if in_backward():
            return
        depth[0] -= 1
        if depth[0] == 0:
            on_exit(module, output_size(output))

    handles = []
    for module in backbone.modules():
        if type(module).__name__ in BLOCK_CLASSES:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Block:
    """One outermost block of a forward: its class, output elements per sample and output width."""

    cls: str
    numel: int
    width: int


def block_outputs(backbone: nn.Module, forward: Callable[[], Any]) -> list[Block]:
    """Every outermost block of one forward, in the order they run (without gradients: on the meta device this
    costs no memory)."""
    found: list[Block] = []
    with (
        torch.no_grad(),
        block_hooks(backbone, lambda m: None, lambda m, size: found.append(Block(type(m).__name__, *size))),
    ):
        forward()
    return found


def mode_of(recipe: Recipe, checkpointing: bool) -> str:
    """The coefficient mode of a run: ``bf16`` under bf16/fp16 mixed precision or with a half-precision teacher,
    else ``fp32``; ``+ckpt`` with activation checkpointing."""
    half = recipe.train.mixed_precision in ("bf16", "fp16") or recipe.teacher.dtype in ("bfloat16", "float16")
    return ("bf16" if half else "fp32") + ("+ckpt" if checkpointing else "")


def coefficients_for(backbone_class: str, mode: str) -> tuple[dict[str, float], str]:
    """The measured coefficients of ``backbone_class`` in ``mode`` and whose they are. A backbone without its own
    measurements borrows, per block class, the largest value measured on any backbone (a conservative estimate)."""
    own = COEFFICIENTS.get(backbone_class, {}).get(mode)
    if own is not None:
        return own, backbone_class
    if not COEFFICIENTS:
        raise ValueError("No activation coefficients: run `python scripts/bench/plan_coefficients.py`.")
    merged: dict[str, float] = {}
    for table in COEFFICIENTS.values():
        for key, value in table.get(mode, {}).items():
            merged[key] = max(merged.get(key, 0.0), value)
    return merged, "largest measured"


@dataclass(frozen=True)
class ActivationEstimate:
    """Activations of one forward with gradients on one micro-batch.

    Attributes:
        graph_bytes: what the forward keeps until its backward.
        transient_bytes: working memory on top while one block runs its backward (or recomputation).
        forward_bytes: the working memory of a forward without gradients on one micro-batch.
        mode: the coefficient mode (``bf16+ckpt``, ...).
        coefficients_of: the backbone class whose measured coefficients were used.
        num_blocks: the blocks of the forward.
    """

    graph_bytes: int
    transient_bytes: int
    forward_bytes: int
    mode: str
    coefficients_of: str
    num_blocks: int


def block_bytes(coef: dict[str, float], block: Block, text_tokens: int) -> float:
    """Bytes one block keeps per sample: ``coef[cls]`` per output element plus ``coef[cls + "/text"]`` per text token
    and unit of width (a cross-attention's keys and values of the prompt)."""
    fallback = max(
        (v for k, v in coef.items() if k not in ("rest", "transient", "forward") and "/" not in k), default=0.0
    )
    per_element = coef.get(block.cls, fallback)
    return per_element * block.numel + coef.get(f"{block.cls}/text", 0.0) * text_tokens * block.width


def estimate_from_blocks(
    blocks: list[Block], backbone_class: str, mode: str, batch: int, text_tokens: int
) -> ActivationEstimate:
    """``ActivationEstimate`` for ``batch`` samples of a forward whose blocks are ``blocks`` (``block_outputs``)."""
    coef, source = coefficients_for(backbone_class, mode)
    plain, _ = coefficients_for(backbone_class, mode.removesuffix("+ckpt"))
    saved = sum(block_bytes(coef, b, text_tokens) for b in blocks)
    mean_block = sum(b.numel for b in blocks) / max(len(blocks), 1)
    saved += coef.get("rest", 0.0) * mean_block
    largest = max((block_bytes(plain, b, text_tokens) for b in blocks), default=0.0)
    transient, forward = coef.get("transient", 0.0) * largest, coef.get("forward", 0.0) * largest
    return ActivationEstimate(
        int(batch * saved), int(batch * transient), int(batch * forward), mode, source, len(blocks)
    )


def estimate_activations(backbone: nn.Module, teacher: Any, shape: TrainingShape, mode: str) -> ActivationEstimate:
    """Run one meta-device forward of ``backbone`` at ``shape`` (batch 1) and scale the measured coefficients."""
    forward = backbone_forward(backbone, teacher, TrainingShape(1, shape.resolution, shape.text_tokens, shape.frames))
    blocks = block_outputs(backbone, forward)
    return estimate_from_blocks(blocks, type(backbone).__name__, mode, shape.batch, shape.text_tokens)
