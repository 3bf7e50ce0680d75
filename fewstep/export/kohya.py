"""The student's LoRA in the file layout ComfyUI, A1111 / Forge and kohya's sd-scripts read, for every family whose
file diffusers reads back too (``pipe.load_lora_weights(file)`` detects and converts it), so each export is checked.

=============  =========================================================================  ==========================
family         keys                                                                       diffusers reads them with
=============  =========================================================================  ==========================
SD1.x, SDXL    ``lora_unet_<diffusers module path, dots as _>.lora_down.weight``,         ``_convert_non_diffusers_``
               ``.lora_up.weight``, ``.alpha`` (the student's ``lora_alpha``)             ``lora_to_diffusers``
Flux           FLUX.1 (BFL) module names: ``lora_unet_double_blocks_<i>_img_attn_qkv``,   ``_convert_kohya_flux_``
               ``..._txt_mlp_0``, ``lora_unet_single_blocks_<i>_linear1``, ...;           ``lora_to_diffusers``
               q, k, v (and a single block's MLP input) are one fused linear there
SD3            diffusers keys (``transformer.<module>.lora_A.weight`` / ``lora_B``) with  the diffusers loader itself
               ``alpha / rank`` folded into ``lora_B``, no metadata needed
=============  =========================================================================  ==========================

Fused Flux linears: the LoRAs of q, k and v (rank ``r`` each) become one LoRA of rank ``3r`` on the fused linear, its
down matrix the three down matrices stacked and its up matrix block-diagonal (``ΔW_qkv = [B_q A_q; B_k A_k; B_v A_v]``
exactly), with ``alpha = 3·lora_alpha`` so that ``alpha / rank`` is the student's scale. diffusers' reader recognises
the block structure and splits it back into three rank-``r`` LoRAs. A part without a LoRA (a single block's
``proj_mlp`` when only attention was trained) is a zero block: it adds nothing.

Why SD3 gets diffusers keys: diffusers has no reader for non-diffusers SD3 LoRA keys, so a kohya-style file
(``lora_transformer_...``) could not be checked; ComfyUI reads the diffusers keys, but ignores the ``lora_alpha`` kept
in the safetensors metadata, hence the folded scale.

What the layouts cannot hold (an error at export time, naming the modules or widths):

* Flux modules outside the transformer blocks (``x_embedder``, ``context_embedder``, ``time_text_embed.*``,
  ``norm_out``, ``proj_out``): diffusers' reader converts them without the ``transformer.`` prefix, so they would
  silently not load (checked with diffusers 0.42).
* Flux transformers other than FLUX.1's shape: the reader maps 19 double and 38 single blocks and splits a single
  block's fused ``linear1`` at FLUX.1's widths (3072, 3072, 3072, 12288).
* Per-layer ranks or alphas, DoRA, LoRA biases.

Text encoder LoRAs: fewstep trains the backbone only, so the files hold no ``lora_te*`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fewstep.export.lora import backbone_component, lora_state_dict, student_adapter_name
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
_A, _B = ".lora_A.weight", ".lora_B.weight"

# FLUX.1 names of FluxTransformer2DModel's modules, per block: BFL linear -> its diffusers parts, in fused order.
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
_FLUX_BLOCKS = {"transformer_blocks": ("double_blocks", FLUX_DOUBLE_BLOCK),
                "single_transformer_blocks": ("single_blocks", FLUX_SINGLE_BLOCK)}  # fmt: skip


def modules_of(state: dict[str, Tensor]) -> list[str]:
    """The module paths of a peft LoRA state dict (``<module>.lora_A.weight`` keys), in order."""
    return [k.removesuffix(_A) for k in state if k.endswith(_A)]


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


def flux_kohya_state_dict(
    state: dict[str, Tensor], rank: int, alpha: float, out_features: Callable[[str], int]
) -> dict[str, Tensor]:
    """Flux: FLUX.1 (BFL) keys as kohya's sd-scripts writes them, q/k/v fused (see the module docstring).

    Args:
        state: the LoRA with peft keys (``transformer_blocks.0.attn.to_q.lora_A.weight``), one rank for all.
        rank, alpha: the LoRA's rank and ``lora_alpha``.
        out_features: the output width of a transformer module by path (for the zero blocks of parts without LoRA).

    Raises:
        ValueError: modules diffusers' reader cannot load back (named), or a transformer that is not FLUX.1-shaped.
    """
    groups: dict[str, dict[str, tuple[int, tuple[str, ...], str]]] = {}  # kohya name -> {module: (slot, parts, key)}
    unmapped = []
    for module in modules_of(state):
        found = _flux_name(module)
        if found is None:
            unmapped.append(module)
            continue
        name, slot, parts, prefix = found
        groups.setdefault(name, {})[module] = (slot, parts, prefix)
    if unmapped:
        raise ValueError(
            f"kohya Flux keys: diffusers' reader of kohya Flux LoRAs cannot load these LoRA modules back: "
            f"{unmapped[:6]} (it knows the double and single transformer blocks of FLUX.1, and converts the other "
            "layers without the transformer prefix, so they would silently not load). Drop them from "
            "student.lora.target_modules, or set export.kohya: false (pytorch_lora_weights.safetensors has them)."
        )
    out: dict[str, Tensor] = {}
    for name, members in sorted(groups.items()):
        _, parts, prefix = next(iter(members.values()))
        by_slot = {slot: module for module, (slot, _, _) in members.items()}
        if len(parts) == 1:
            down, up, group_alpha = state[by_slot[0] + _A], state[by_slot[0] + _B], float(alpha)
        else:
            widths = [out_features(f"{prefix}.{part}") for part in parts]
            if name.endswith("_linear1") and tuple(widths) != FLUX1_LINEAR1_WIDTHS:
                raise ValueError(
                    f"kohya Flux keys: a single block's fused linear1 ({', '.join(parts)}) of this transformer has the "
                    f"widths {tuple(widths)}; diffusers' reader splits it at FLUX.1's {FLUX1_LINEAR1_WIDTHS}, so it "
                    "would not load back. Keep the LoRA off the single blocks' attention and proj_mlp, or set "
                    "export.kohya: false."
                )
            down, up = _fused(state, [by_slot.get(i) for i in range(len(parts))], widths, rank)
            group_alpha = float(alpha) * len(parts)  # fused rank len(parts)·r: alpha / rank stays the student's scale
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(group_alpha)
    return out


def _flux_name(module: str) -> tuple[str, int, tuple[str, ...], str] | None:
    """``(kohya name, slot in the fused linear, its parts, block prefix)`` of a diffusers Flux module path."""
    block, _, rest = module.partition(".")
    index, _, part = rest.partition(".")
    if block not in _FLUX_BLOCKS or not index.isdigit() or int(index) >= FLUX1_BLOCKS[block]:
        return None
    bfl, table = _FLUX_BLOCKS[block]
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


def kohya_state_dict(student: Student, teacher: Teacher) -> dict[str, Tensor]:
    """The student's LoRA in its family's ComfyUI / kohya layout (see the module docstring).

    Raises:
        ValueError: a full student, per-layer ranks or alphas, DoRA or LoRA biases, a family without such a layout,
            or modules the layout cannot hold.
    """
    backbone = student.denoiser.backbone
    config = backbone.peft_config[student_adapter_name(student)]
    if config.alpha_pattern or config.rank_pattern or getattr(config, "use_dora", False):
        raise ValueError(
            "kohya export needs one rank and alpha for every layer and plain LoRA (no rank_pattern / alpha_pattern, "
            "no DoRA); set export.kohya: false."
        )
    state = lora_state_dict(student)
    extra = sorted(k for k in state if not k.endswith((_A, _B)))
    if extra:
        raise ValueError(f"kohya export holds LoRA down/up weights only; the student also has {extra[:4]}.")
    component, family = backbone_component(teacher), teacher.family
    if component == "unet":
        return unet_kohya_state_dict(state, config.lora_alpha)
    if family in ("sd3", "sd35"):
        return folded_state_dict(state, config.r, config.lora_alpha, component)
    if family == "flux":
        return flux_kohya_state_dict(state, config.r, config.lora_alpha,
                                     lambda path: backbone.get_submodule(path).out_features)  # fmt: skip
    raise ValueError(f"No ComfyUI / kohya LoRA layout for the {family} family; set export.kohya: false.")


def save_kohya(student: Student, teacher: Teacher, out_dir: str | Path, weight_name: str = KOHYA_WEIGHT_NAME) -> Path:
    """Write ``kohya_state_dict(student, teacher)`` as ``<out_dir>/pytorch_lora_weights_kohya.safetensors``.

    Returns:
        The path of the written file.
    """
    from safetensors.torch import save_file

    state = kohya_state_dict(student, teacher)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / weight_name))
    return out_dir / weight_name
