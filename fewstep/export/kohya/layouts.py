"""The key layouts of ``fewstep.export.kohya``: one mapping table per family and the writers that apply them to a peft
LoRA state dict (``<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, one rank and alpha for all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_A, _B = ".lora_A.weight", ".lora_B.weight"
ORIGINAL_PREFIX = "diffusion_model"  # the original repositories' (and ComfyUI's) root of the transformer's weights


def modules_of(state: dict[str, Tensor]) -> list[str]:
    """The module paths of a peft LoRA state dict (``<module>.lora_A.weight`` keys), in order."""
    return [k.removesuffix(_A) for k in state if k.endswith(_A)]


def unloadable(family: str, modules: list[str], reason: str) -> ValueError:
    """The error for LoRA modules that a family's layout, as diffusers reads it back, cannot hold."""
    return ValueError(
        f"kohya {family} keys: diffusers' reader of this layout cannot load these LoRA modules back: {modules[:6]} "
        f"({reason}). Drop them from student.lora.target_modules, or set export.kohya: false "
        "(pytorch_lora_weights.safetensors has them)."
    )


def unet_kohya_state_dict(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """SD1.x / SDXL: diffusers' own ``convert_state_dict_to_kohya`` (it writes ``alpha = rank``; the student's
    ``alpha`` is written instead, so the scale ``alpha / rank`` survives)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def folded_state_dict(state: dict[str, Tensor], rank: int, alpha: float, prefix: str) -> dict[str, Tensor]:
    """diffusers keys (``<prefix>.<module>.lora_A.weight``) with ``alpha / rank`` folded into ``lora_B``: any loader
    that assumes ``alpha = rank`` (diffusers without metadata, ComfyUI without ``.alpha`` keys) applies the student's
    scale."""
    scale = float(alpha) / rank
    return {f"{prefix}.{k}": (v * scale if k.endswith(_B) else v).contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The original repositories' module names under ``diffusion_model.`` (Wan, Qwen-Image, LTX-Video)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Renaming:
    """A transformer's original module names, as the family's repository and ComfyUI name them.

    Attributes:
        blocks: ``(diffusers block list, its original name)``, e.g. ``("blocks", "blocks")``.
        block: a diffusers module inside a block -> its original name; ``None``: the same names.
        top: a diffusers module outside the blocks -> its original name; ``None``: the same names.
        unmapped: why the other modules cannot be held (the export error says it).
        check: what else the reader needs, given the written keys (raises ``ValueError``).
    """

    blocks: tuple[str, str]
    block: dict[str, str] | None
    top: dict[str, str] | None
    unmapped: str
    check: Callable[[list[str]], None] | None = None


def check_wan_reader(names: list[str]) -> None:
    """What diffusers' Wan reader needs beyond names: at least one block (it counts them), and the image keys and
    values together (it only recognises an image-to-video LoRA by both)."""
    if not any(n.startswith(f"{ORIGINAL_PREFIX}.blocks.") for n in names):
        raise ValueError("kohya Wan keys: diffusers' Wan reader needs LoRA modules in the transformer blocks; "
                         "add them to student.lora.target_modules, or set export.kohya: false.")  # fmt: skip
    image = {part for n in names for part in ("k_img", "v_img") if f".cross_attn.{part}." in n}
    if len(image) == 1:
        raise ValueError(
            f"kohya Wan keys: the LoRA has cross_attn.{image.pop()} (attn2.add_k_proj / add_v_proj) without its "
            "partner; diffusers' Wan reader only converts the two together. Target both, or set export.kohya: false."
        )


WAN = Renaming(
    blocks=("blocks", "blocks"),
    block={
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o",
        "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
        "attn2.to_out.0": "cross_attn.o",
        "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # Wan 2.1 I2V's image tokens
        "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    },
    top={
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
        "proj_out": "head.head",
    },
    unmapped="it maps the blocks' attention and FFN linears, the time, text and image embedders and the head",
    check=check_wan_reader,
)  # fmt: skip
QWEN_IMAGE = Renaming(blocks=("transformer_blocks", "transformer_blocks"), block=None, top=None, unmapped="")
# LTX-Video calls proj_in `patchify_proj` and time_embed `adaln_single`; diffusers' reader keeps the names it is given
LTX = Renaming(
    blocks=("transformer_blocks", "transformer_blocks"),
    block=None,
    top={name: name for name in ("caption_projection.linear_1", "caption_projection.linear_2", "proj_out")},
    unmapped="it keeps the names as they are, and LTX-Video names proj_in and time_embed patchify_proj and "
    "adaln_single, so no name loads in both",
)


def original_name(module: str, renaming: Renaming) -> str | None:
    """The original name of a diffusers module path, or ``None`` where the layout has none."""
    blocks, original = renaming.blocks
    head, _, rest = module.partition(".")
    index, _, part = rest.partition(".")
    if head == blocks and index.isdigit():
        name = part if renaming.block is None else renaming.block.get(part)
        return None if name is None else f"{original}.{index}.{name}"
    return module if renaming.top is None else renaming.top.get(module)


def renamed_state_dict(
    state: dict[str, Tensor], rank: int, alpha: float, renaming: Renaming, family: str
) -> dict[str, Tensor]:
    """``diffusion_model.<original name>.lora_A.weight`` / ``.lora_B.weight`` with ``alpha / rank`` folded into
    ``lora_B`` (no ``.alpha`` keys: diffusers' Wan reader leaves them unconverted outside the blocks, its LTX reader
    has none, and ComfyUI reads a missing alpha as ``alpha = rank``).

    Raises:
        ValueError: modules without an original name (named).
    """
    names = {module: original_name(module, renaming) for module in modules_of(state)}
    unmapped = [module for module, name in names.items() if name is None]
    if unmapped:
        raise unloadable(family, unmapped, renaming.unmapped)
    scale = float(alpha) / rank
    out = {}
    for module, name in names.items():
        out[f"{ORIGINAL_PREFIX}.{name}.lora_A.weight"] = state[module + _A].contiguous()
        out[f"{ORIGINAL_PREFIX}.{name}.lora_B.weight"] = (state[module + _B] * scale).contiguous()
    if renaming.check is not None:
        renaming.check(list(out))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Original names in kohya's form, q, k, v fused: BFL's (FLUX.1, Chroma, FLUX.2), Z-Image's
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLayout:
    """A transformer's original names as kohya's sd-scripts writes them (``lora_unet_double_blocks_<i>_img_attn_qkv``,
    ``lora_unet_layers_<i>_attention_qkv``), q, k and v one linear there.

    Attributes:
        name: the model, for messages.
        blocks: diffusers block list -> (original block list, its table: original linear -> its diffusers parts in
            fused order, the number of blocks diffusers' reader maps or ``None`` for any).
        top: a diffusers module outside the blocks -> its kohya name.
        split_at: a fused original linear -> the widths at which diffusers' reader splits it (others: equal parts).
        unmapped: why the other modules cannot be held (the export error says it).
    """

    name: str
    blocks: dict[str, tuple[str, dict[str, tuple[str, ...]], int | None]]
    top: dict[str, str]
    split_at: dict[str, tuple[int, ...]]
    unmapped: str


FLUX_DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
FLUX_SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
FLUX1_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}  # blocks diffusers' reader maps
FLUX1_LINEAR1_WIDTHS = (3072, 3072, 3072, 12288)  # where diffusers' reader splits a single block's linear1
FLUX1 = FusedLayout(
    name="FLUX.1",
    blocks={"transformer_blocks": ("double_blocks", FLUX_DOUBLE_BLOCK, FLUX1_BLOCKS["transformer_blocks"]),
            "single_transformer_blocks": ("single_blocks", FLUX_SINGLE_BLOCK,
                                          FLUX1_BLOCKS["single_transformer_blocks"])},
    top={},
    split_at={"linear1": FLUX1_LINEAR1_WIDTHS},
    unmapped="it knows the double and single transformer blocks of FLUX.1, and converts the other layers without the "
    "transformer prefix, so they would silently not load",
)  # fmt: skip
# FLUX.2 (Flux2Transformer2DModel): SwiGLU MLPs, a single block's linear1 is already one diffusers linear, and the
# modulations are shared by all blocks (outside them)
FLUX2_DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.linear_in",),
    "img_mlp_2": ("ff.linear_out",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.linear_in",),
    "txt_mlp_2": ("ff_context.linear_out",),
}
FLUX2_SINGLE_BLOCK = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
FLUX2 = FusedLayout(
    name="FLUX.2",
    blocks={"transformer_blocks": ("double_blocks", FLUX2_DOUBLE_BLOCK, None),
            "single_transformer_blocks": ("single_blocks", FLUX2_SINGLE_BLOCK, None)},
    top={"x_embedder": "lora_unet_img_in", "context_embedder": "lora_unet_txt_in",
         "time_guidance_embed.timestep_embedder.linear_1": "lora_unet_time_in_in_layer",
         "time_guidance_embed.timestep_embedder.linear_2": "lora_unet_time_in_out_layer",
         "proj_out": "lora_unet_final_layer_linear"},
    split_at={},
    unmapped="it maps the blocks' attention and MLPs, img_in, txt_in, the timestep embedder and the final linear; "
    "the guidance embedder, the shared modulations and norm_out would be left unconverted",
)  # fmt: skip


# Chroma (ChromaTransformer2DModel): FLUX.1's blocks without their modulation linears (one approximator,
# distilled_guidance_layer, computes every block's modulation); diffusers reads it with its FLUX.1 reader
CHROMA = FusedLayout(
    name="Chroma",
    blocks=FLUX1.blocks,
    top={},
    split_at={"linear1": FLUX1_LINEAR1_WIDTHS},  # Chroma's single blocks are FLUX.1's
    unmapped="diffusers reads Chroma with its FLUX.1 reader, which knows the double and single transformer blocks and "
    "converts the other layers (the approximator distilled_guidance_layer, x_embedder, context_embedder, proj_out) "
    "without the transformer prefix, so they would silently not load",
)
# Z-Image (ZImageTransformer2DModel): its original names, which ComfyUI keeps (`attention.qkv`, `attention.out`); the
# main layers and both refiners are the same block. diffusers' reader splits qkv into three equal parts (q, k, v are
# always as wide as the model)
ZIMAGE_BLOCK = {
    "attention_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention_out": ("attention.to_out.0",),
    "feed_forward_w1": ("feed_forward.w1",),
    "feed_forward_w2": ("feed_forward.w2",),
    "feed_forward_w3": ("feed_forward.w3",),
    "adaLN_modulation_0": ("adaLN_modulation.0",),
}
ZIMAGE = FusedLayout(
    name="Z-Image",
    blocks={blocks: (blocks, ZIMAGE_BLOCK, None) for blocks in ("layers", "noise_refiner", "context_refiner")},
    top={"t_embedder.mlp.0": "lora_unet_t_embedder_mlp_0", "t_embedder.mlp.2": "lora_unet_t_embedder_mlp_2",
         "cap_embedder.1": "lora_unet_cap_embedder_1"},
    split_at={},
    unmapped="it maps the layers' and refiners' attention, feed-forward and modulation, the timestep and caption "
    "embedders; ComfyUI names the patch embedder and the final layer x_embedder and final_layer, diffusers' reader "
    "all_x_embedder and all_final_layer, so no name loads in both",
)  # fmt: skip


def fused_kohya_state_dict(
    state: dict[str, Tensor], rank: int, alpha: float, out_features: Callable[[str], int], layout: FusedLayout
) -> dict[str, Tensor]:
    """FLUX.1, Chroma, FLUX.2, Z-Image: original keys as kohya's sd-scripts writes them, q/k/v fused (see
    ``fewstep.export.kohya``).

    Args:
        state: the LoRA with peft keys (``transformer_blocks.0.attn.to_q.lora_A.weight``), one rank for all.
        rank, alpha: the LoRA's rank and ``lora_alpha``.
        out_features: the output width of a transformer module by path (for the zero blocks of parts without LoRA).
        layout: ``FLUX1``, ``CHROMA``, ``FLUX2`` or ``ZIMAGE``.

    Raises:
        ValueError: modules diffusers' reader cannot load back (named), or a fused linear it would split elsewhere.
    """
    groups: dict[str, dict[str, tuple[int, tuple[str, ...], str]]] = {}  # kohya name -> {module: (slot, parts, key)}
    unmapped = []
    for module in modules_of(state):
        found = _fused_name(module, layout)
        if found is None:
            unmapped.append(module)
            continue
        name, slot, parts, prefix = found
        groups.setdefault(name, {})[module] = (slot, parts, prefix)
    if unmapped:
        raise unloadable(layout.name, unmapped, layout.unmapped)
    out: dict[str, Tensor] = {}
    for name, members in sorted(groups.items()):
        _, parts, prefix = next(iter(members.values()))
        by_slot = {slot: module for module, (slot, _, _) in members.items()}
        if len(parts) == 1:
            down, up, group_alpha = state[by_slot[0] + _A], state[by_slot[0] + _B], float(alpha)
        else:
            widths = [out_features(f"{prefix}.{part}" if prefix else part) for part in parts]
            split = next((w for linear, w in layout.split_at.items() if name.endswith(f"_{linear}")), None)
            if split is not None and tuple(widths) != split:
                raise ValueError(
                    f"kohya {layout.name} keys: a single block's fused linear1 ({', '.join(parts)}) of this "
                    f"transformer has the widths {tuple(widths)}; diffusers' reader splits it at {layout.name}'s "
                    f"{split}, so it would not load back. Keep the LoRA off the single blocks' attention and "
                    "proj_mlp, or set export.kohya: false."
                )
            down, up = _fused(state, [by_slot.get(i) for i in range(len(parts))], widths, rank)
            group_alpha = float(alpha) * len(parts)  # fused rank len(parts)·r: alpha / rank stays the student's scale
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(group_alpha)
    return out


def _fused_name(module: str, layout: FusedLayout) -> tuple[str, int, tuple[str, ...], str] | None:
    """``(kohya name, slot in the fused linear, its parts, block prefix)`` of a diffusers module path."""
    if module in layout.top:
        return layout.top[module], 0, (module,), ""
    block, _, rest = module.partition(".")
    index, _, part = rest.partition(".")
    if block not in layout.blocks or not index.isdigit():
        return None
    bfl, table, count = layout.blocks[block]
    if count is not None and int(index) >= count:
        return None
    for name, parts in table.items():
        if part in parts:
            return f"lora_unet_{bfl}_{index}_{name}", parts.index(part), parts, f"{block}.{index}"
    return None


def _fused(state: dict[str, Tensor], modules: list[str | None], widths: list[int], rank: int) -> tuple[Tensor, Tensor]:
    """One LoRA for a fused linear: downs stacked ``[n·r, in]``, ups block-diagonal ``[Σ widths, n·r]`` (zero blocks
    for parts without a LoRA)."""
    present = [m for m in modules if m is not None]
    reference = state[present[0] + _A]
    in_features = reference.shape[1]
    down = torch.zeros(len(modules) * rank, in_features, dtype=reference.dtype)
    up = torch.zeros(sum(widths), len(modules) * rank, dtype=reference.dtype)
    row = 0
    for slot, (module, width) in enumerate(zip(modules, widths, strict=True)):
        if module is not None:
            down[slot * rank : (slot + 1) * rank] = state[module + _A]
            up[row : row + width, slot * rank : (slot + 1) * rank] = state[module + _B]
        row += width
    return down, up
