"""The student's LoRA in the file layout ComfyUI's Load LoRA node reads (for SD and FLUX.1 also A1111 / Forge and
kohya's sd-scripts), for every family whose file diffusers reads back too (``pipe.load_lora_weights(file)`` detects and
converts it), so each export is checked. The key tables are in ``fewstep.export.kohya.layouts``.

=============  =========================================================================  ==========================
family         keys                                                                       diffusers reads them with
=============  =========================================================================  ==========================
SD1.x, SDXL    ``lora_unet_<diffusers module path, dots as _>.lora_down.weight``,         ``_convert_non_diffusers_``
               ``.lora_up.weight``, ``.alpha`` (the student's ``lora_alpha``)             ``lora_to_diffusers``
Flux           FLUX.1 (BFL) module names: ``lora_unet_double_blocks_<i>_img_attn_qkv``,   ``_convert_kohya_flux_``
               ``..._txt_mlp_0``, ``lora_unet_single_blocks_<i>_linear1``, ...;           ``lora_to_diffusers``
               q, k, v (and a single block's MLP input) are one fused linear there
Chroma         the same (Chroma's blocks are FLUX.1's without the modulation linears)     the same
FLUX.2         FLUX.2 (BFL) names the same way (``..._img_mlp_0`` is the SwiGLU input,    ``_convert_kohya_flux2_``
               ``lora_unet_single_blocks_<i>_linear1`` one linear already), and           ``lora_to_diffusers``
               ``lora_unet_img_in``, ``_txt_in``, ``_time_in_*``, ``_final_layer_linear``
Wan 2.1, 2.2   Wan's names: ``diffusion_model.blocks.<i>.self_attn.q.lora_A.weight``,     ``_convert_non_diffusers_``
               ``.lora_B.weight``; ``cross_attn.k_img``, ``ffn.0``, ``time_embedding.0``, ``wan_lora_to_diffusers``
               ``head.head``, ...; ``alpha / rank`` folded into ``lora_B``
Qwen-Image     ``diffusion_model.<module>.lora_A/B.weight`` (Qwen-Image's names are       ``_convert_non_diffusers_``
               diffusers'), ``alpha / rank`` folded into ``lora_B``                       ``qwen_lora_to_diffusers``
LTX-Video      the same for the modules LTX-Video and diffusers name alike                ``_convert_non_diffusers_``
                                                                                          ``ltxv_lora_to_diffusers``
Z-Image        Z-Image's (and ComfyUI's) names: ``lora_unet_layers_<i>_attention_qkv``   ``_convert_non_diffusers_``
               (q, k, v fused), ``..._attention_out``, ``..._feed_forward_w1``,           ``z_image_lora_to_diffusers``
               ``..._adaLN_modulation_0``, the same for ``noise_refiner_<i>`` and
               ``context_refiner_<i>``, ``lora_unet_t_embedder_mlp_0/2``,
               ``lora_unet_cap_embedder_1``; ``.alpha`` (the student's ``lora_alpha``)
SD3, SD3.5,    diffusers keys (``transformer.<module>.lora_A.weight`` / ``lora_B``) with  the diffusers loader itself
Sana,          ``alpha / rank`` folded into ``lora_B``, no metadata needed
CogVideoX
=============  =========================================================================  ==========================

Fused linears (FLUX, Z-Image): the LoRAs of q, k and v (rank ``r`` each) become one LoRA of rank ``3r`` on the fused
linear, its down matrix the three down matrices stacked and its up matrix block-diagonal
(``ΔW_qkv = [B_q A_q; B_k A_k; B_v A_v]`` exactly), with ``alpha = 3·lora_alpha`` so that ``alpha / rank`` is the
student's scale. diffusers' FLUX readers recognise the block structure and split it back into three rank-``r`` LoRAs;
its Z-Image reader splits the up matrix into three equal parts and gives each the whole down matrix (rank ``3r``, the
other parts' columns zero: the same update). A part without a LoRA (a FLUX.1 single block's ``proj_mlp`` when only
attention was trained) is a zero block: it adds nothing.

Wan 2.2 A14B (two experts) gets two files, each loadable on its own: ``transformer``'s in ``KOHYA_WEIGHT_NAME``,
``transformer_2``'s in ``KOHYA_TRANSFORMER_2_WEIGHT_NAME``, both with Wan's names (ComfyUI loads each on its expert's
model; diffusers with ``load_lora_weights(..., load_into_transformer_2=True)`` for the second).

Why some families get diffusers keys: diffusers has no reader for non-diffusers SD3, Sana or CogVideoX LoRA keys, so a
file in another layout could not be checked. Loaders that read diffusers keys without the ``lora_alpha`` kept in the
safetensors metadata (ComfyUI) would apply scale 1, hence the folded scale. Why Wan, Qwen-Image and LTX-Video fold it
too: diffusers' Wan reader converts ``.alpha`` only inside the blocks and its LTX reader not at all.

What the layouts cannot hold (an error at export time, naming the modules or widths):

* Flux modules outside the transformer blocks (``x_embedder``, ``context_embedder``, ``time_text_embed.*``,
  ``norm_out``, ``proj_out``): diffusers' reader converts them without the ``transformer.`` prefix, so they would
  silently not load (checked with diffusers 0.42). FLUX.1 transformers of another shape: the reader maps 19 double and
  38 single blocks and splits a single block's fused ``linear1`` at FLUX.1's widths (3072, 3072, 3072, 12288).
* Chroma's approximator (``distilled_guidance_layer.*``), ``x_embedder``, ``context_embedder`` and ``proj_out``:
  diffusers reads Chroma with its FLUX.1 reader, which converts them without the ``transformer.`` prefix. Chroma's
  single blocks are FLUX.1's width, so their ``linear1`` splits right.
* Z-Image's patch embedder and final layer (``all_x_embedder.*``, ``all_final_layer.*``): ComfyUI names them
  ``x_embedder`` and ``final_layer``, diffusers' reader only by their diffusers names, so no name loads in both.
* FLUX.2's guidance embedder, shared modulations (``double_stream_modulation_*``, ``single_stream_modulation``) and
  ``norm_out``: diffusers' kohya FLUX.2 reader leaves them unconverted.
* Wan modules outside its table (``patch_embedding``, a conv), and LTX-Video's ``proj_in`` and ``time_embed.*``
  (LTX-Video's ``patchify_proj`` and ``adaln_single``: diffusers' reader keeps the names it is given).
* PixArt-Σ: ``PixArtSigmaPipeline`` has no LoRA loader in diffusers (a LoRA export of it is a merged pipeline).
* Per-layer ranks or alphas, DoRA, LoRA biases.

Text encoder LoRAs: fewstep trains the backbone only, so the files hold no ``lora_te*`` keys.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from fewstep.export.kohya.layouts import (
    CHROMA,
    FLUX1,
    FLUX1_LINEAR1_WIDTHS,
    FLUX2,
    LTX,
    QWEN_IMAGE,
    WAN,
    ZIMAGE,
    folded_state_dict,
    fused_kohya_state_dict,
    renamed_state_dict,
    unet_kohya_state_dict,
)
from fewstep.export.lora import (
    TRANSFORMER_2_WEIGHT_NAME,
    backbone_component,
    expert_lora_files,
    lora_state_dict,
    student_adapter_name,
)
from fewstep.models.backbones import WanExperts
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher

__all__ = ["FLUX1_LINEAR1_WIDTHS", "KOHYA_TRANSFORMER_2_WEIGHT_NAME", "KOHYA_WEIGHT_NAME", "kohya_files",
           "kohya_state_dict", "save_kohya"]  # fmt: skip

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
# Wan 2.2's low-noise expert; not ending in WEIGHT_NAME, as TRANSFORMER_2_WEIGHT_NAME
KOHYA_TRANSFORMER_2_WEIGHT_NAME = "pytorch_lora_weights_kohya_transformer_2.safetensors"
FOLDED_FAMILIES = ("sd3", "sd35", "sana", "cogvideox")  # no non-diffusers reader in diffusers: diffusers keys
RENAMED = {"wan21": WAN, "wan21_i2v": WAN, "wan22": WAN, "wan22_ti2v": WAN, "qwen_image": QWEN_IMAGE, "ltx": LTX}
FUSED = {"flux": FLUX1, "chroma": CHROMA, "flux2": FLUX2, "zimage": ZIMAGE}


def kohya_files(student: Student, teacher: Teacher) -> dict[str, dict[str, Tensor]]:
    """The student's LoRA in its family's ComfyUI / kohya layout (see the module docstring), as
    ``{file name: state dict}``: ``KOHYA_WEIGHT_NAME``, and for Wan 2.2's two experts also
    ``KOHYA_TRANSFORMER_2_WEIGHT_NAME`` (one file per expert that has LoRA weights, as ``save_lora`` writes them).

    Raises:
        ValueError: a full student, per-layer ranks or alphas, DoRA or LoRA biases, a family without such a layout,
            a pipeline without a LoRA loader, or modules the layout cannot hold.
    """
    state, rank, alpha = _plain_lora(student)
    if isinstance(student.denoiser.backbone, WanExperts):  # Wan 2.2 A14B: one file per expert, each with Wan's names
        experts = expert_lora_files(state, KOHYA_WEIGHT_NAME, getattr(student, "component", None))
        kohya_name = {TRANSFORMER_2_WEIGHT_NAME: KOHYA_TRANSFORMER_2_WEIGHT_NAME}  # transformer's is KOHYA_WEIGHT_NAME
        return {kohya_name.get(name, name): renamed_state_dict(part, rank, alpha, WAN, teacher.family)
                for name, (_, part) in experts.items()}  # fmt: skip
    return {KOHYA_WEIGHT_NAME: _layout_state_dict(state, rank, alpha, teacher)}


def _plain_lora(student: Student) -> tuple[dict[str, Tensor], int, float]:
    """The student's LoRA state dict (peft keys), rank and ``lora_alpha``; refuses what no layout holds."""
    config = student.denoiser.backbone.peft_config[student_adapter_name(student)]
    if config.alpha_pattern or config.rank_pattern or getattr(config, "use_dora", False):
        raise ValueError(
            "kohya export needs one rank and alpha for every layer and plain LoRA (no rank_pattern / alpha_pattern, "
            "no DoRA); set export.kohya: false."
        )
    state = lora_state_dict(student)
    extra = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if extra:
        raise ValueError(f"kohya export holds LoRA down/up weights only; the student also has {extra[:4]}.")
    return state, config.r, config.lora_alpha


def _layout_state_dict(state: dict[str, Tensor], rank: int, alpha: float, teacher: Teacher) -> dict[str, Tensor]:
    """One backbone's LoRA in its family's layout."""
    family, component = teacher.family, backbone_component(teacher)
    if not hasattr(type(teacher.pipeline), "load_lora_weights"):
        raise ValueError(
            f"No ComfyUI / kohya LoRA file for the {family} family: {type(teacher.pipeline).__name__} has no LoRA "
            "loader in diffusers, so such a file could not be checked (a LoRA export of it is a merged pipeline). "
            "Set export.kohya: false and export.merged: true."
        )
    if component == "unet":
        return unet_kohya_state_dict(state, alpha)
    if family in FOLDED_FAMILIES:
        return folded_state_dict(state, rank, alpha, component)
    if family in RENAMED:
        return renamed_state_dict(state, rank, alpha, RENAMED[family], family)
    if family in FUSED:
        backbone = teacher.denoiser.backbone
        return fused_kohya_state_dict(state, rank, alpha, lambda path: backbone.get_submodule(path).out_features,
                                      FUSED[family])  # fmt: skip
    raise ValueError(f"No ComfyUI / kohya LoRA layout for the {family} family; set export.kohya: false.")


def kohya_state_dict(student: Student, teacher: Teacher) -> dict[str, Tensor]:
    """``kohya_files``' one file, for every family but Wan 2.2 A14B (two experts: two files, see ``kohya_files``)."""
    files = kohya_files(student, teacher)
    if len(files) > 1:
        raise ValueError(f"This student's ComfyUI / kohya LoRA is {len(files)} files ({', '.join(files)}), one per "
                         "expert: use kohya_files or save_kohya.")  # fmt: skip
    return next(iter(files.values()))


def save_kohya(student: Student, teacher: Teacher, out_dir: str | Path) -> Path:
    """Write ``kohya_files(student, teacher)`` into ``out_dir`` (``pytorch_lora_weights_kohya.safetensors``, and
    Wan 2.2's ``pytorch_lora_weights_kohya_transformer_2.safetensors``).

    Returns:
        The path of the first written file.
    """
    from safetensors.torch import save_file

    files = kohya_files(student, teacher)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, state in files.items():
        save_file(state, str(out_dir / name))
    return out_dir / next(iter(files))
