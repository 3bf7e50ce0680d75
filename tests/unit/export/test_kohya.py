"""ComfyUI / kohya LoRA files for every family, read back by stock diffusers: ``pipe.load_lora_weights(file)`` detects
the layout, converts it without a warning, and the pipeline then samples what the student's own network samples in
the same pipeline (same latents, same steps) to float rounding."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fewstep.export import KOHYA_WEIGHT_NAME, export_student, lora_state_dict, save_kohya
from fewstep.export.kohya import FLUX1_LINEAR1_WIDTHS, KOHYA_TRANSFORMER_2_WEIGHT_NAME, kohya_state_dict
from fewstep.export.kohya.layouts import CHROMA, FLUX1, fused_kohya_state_dict
from fewstep.models.backbones import latent_shape, ltx_pack_latents, pack_latents
from fewstep.models.loading import load_teacher
from fewstep.models.student import DEFAULT_LORA_TARGETS, Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.testing.zoo import COGVIDEOX_TEXT_TOKENS
from tests.helpers import move_lora_away, single_thread  # noqa: F401 (fixture)

TOLERANCE = 1e-5
RANK, ALPHA = 4, 8  # alpha ≠ rank: a file that lost the scale samples visibly differently
# Flux's double blocks only: a single block's fused linear1 is split by diffusers at FLUX.1's widths (see below)
FLUX_DOUBLE_BLOCKS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|norm1\.linear|norm1_context\.linear)"
)
# Beyond the default targets, the modules outside the blocks that each layout maps (and Wan's FFN)
TRANSFORMER = DEFAULT_LORA_TARGETS["transformer"]
WAN_TARGETS = [*TRANSFORMER, "ffn.net.0.proj", "ffn.net.2", "time_embedder.linear_1", "time_embedder.linear_2",
               "time_proj", "text_embedder.linear_1", "text_embedder.linear_2", "proj_out"]  # fmt: skip
FLUX2_TARGETS = (  # the single blocks' attn.to_out, not the double blocks' to_out ModuleList
    r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|linear_in|linear_out|to_qkv_mlp_proj"
    r"|single_transformer_blocks\.\d+\.attn\.to_out|x_embedder|context_embedder|timestep_embedder\.linear_\d|proj_out)"
)
# the blocks' modulation (the final layer's adaLN_modulation.0 is a SiLU), the timestep and caption embedders
ZIMAGE_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|feed_forward\.w\d|(layers|refiner)\.\d+\.adaLN_modulation\.0"
                  r"|t_embedder\.mlp\.[02]|cap_embedder\.1)")  # fmt: skip
TARGETS = {"sd15": DEFAULT_LORA_TARGETS["unet"], "sdxl": DEFAULT_LORA_TARGETS["unet"], "flux": FLUX_DOUBLE_BLOCKS,
           "chroma": FLUX_DOUBLE_BLOCKS, "flux2": FLUX2_TARGETS, "zimage": ZIMAGE_TARGETS, "wan21": WAN_TARGETS,
           "wan21_i2v": WAN_TARGETS, "wan22": WAN_TARGETS, "wan22_ti2v": WAN_TARGETS,
           "qwen_image": [*TRANSFORMER, "img_in", "txt_in", "img_mod.1", "txt_mod.1", "norm_out.linear", "proj_out",
                          "timestep_embedder.linear_1"],
           "ltx": [*TRANSFORMER, "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"]}  # fmt: skip
STEPS = {"wan22": 4}  # the low-noise expert samples from the 4th of 4 steps (shift 12, boundary 875); default 2
PROMPT = "a red circle"
FAMILIES = ["sd15", "sdxl", "sd3", "sd35", "flux", "chroma", "flux2", "qwen_image", "zimage", "wan21", "wan21_i2v",
            "wan22", "wan22_ti2v", "ltx", "sana", "cogvideox"]  # fmt: skip


def lora_student(family: str, targets=None) -> tuple:
    """A tiny teacher and a rank-4, alpha-8 LoRA student with random (non-zero) up weights."""
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    torch.manual_seed(0)
    student = Student.lora(teacher, rank=RANK, alpha=ALPHA, target_modules=targets)
    move_lora_away(student)
    return teacher, student


def initial_latents(family: str, pipe, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """Fixed initial latents in the pipeline's own layout (from fewstep's ``[1, c, h, w]`` or ``[1, c, f, h, w]``)
    and the size arguments that go with them."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if x.dim() == 5:  # video: [1, c, f, h, w]
        f, h, w = shape[2:]
        if family == "ltx":  # packed tokens; 8× in time, 32× in space
            return ltx_pack_latents(x), {"num_frames": 8 * (f - 1) + 1, "height": 32 * h, "width": 32 * w}
        if family == "cogvideox":  # [1, f, c, h, w]; the tiny transformer reads 16 T5 tokens
            return x.permute(0, 2, 1, 3, 4), {"num_frames": 4 * (f - 1) + 1, "height": 8 * h, "width": 8 * w,
                                              "max_sequence_length": COGVIDEOX_TEXT_TOKENS}  # fmt: skip
        space, time = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        size = {"num_frames": time * (f - 1) + 1, "height": space * h, "width": space * w}
        if family == "wan21_i2v":  # its own prompt cleaning needs ftfy; WanPipeline's UMT5 encoding is the same
            from diffusers import WanPipeline

            embed = [WanPipeline._get_t5_prompt_embeds(pipe, [text], 1, 32, "cpu") for text in (PROMPT, "")]
            size.update(image=Image.new("RGB", (size["width"], size["height"]), (200, 40, 40)),
                        prompt_embeds=embed[0], negative_prompt_embeds=embed[1])  # fmt: skip
        return x, size
    b, c, h, w = shape
    size = {"height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}
    if family in ("flux", "chroma"):
        return pack_latents(x), {**size, "max_sequence_length": 8}  # [1, tokens, 4c]; 8 T5 tokens (512 by default)
    if family == "qwen_image":
        return pipe._pack_latents(x, b, c, h, w), {**size, "true_cfg_scale": 1.0}  # no negative prompt: no CFG
    if family == "flux2":  # noise drawn patchified 2×2: [1, 4c, h/2, w/2]
        return x, {"height": 2 * size["height"], "width": 2 * size["width"], "max_sequence_length": 16}
    if family == "sana":
        size["use_resolution_binning"] = False
    return x, size


def stock_latents(pipe, family: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The pipeline's output latents for fixed initial latents, prompt and re-noise seed (2 steps, 4 for Wan 2.2, the
    pipeline's own guidance)."""
    latents, size = initial_latents(family, pipe, shape)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(2)  # pipelines that do not pass `generator` to scheduler.step draw from the global RNG
    text = {} if "prompt_embeds" in size else {"prompt": PROMPT}
    return pipe(**text, latents=latents, num_inference_steps=STEPS.get(family, 2), output_type="latent",
                generator=torch.Generator().manual_seed(2), **size)[0]  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_reporting(pipe, path, **kwargs) -> list[str]:
    """``pipe.load_lora_weights(path, **kwargs)``; returns every warning it raised or logged, except diffusers' notice
    that the text encoders got no LoRA keys (fewstep trains the backbone only)."""
    records = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    finally:
        logger.removeHandler(records)
    messages = [str(w.message) for w in caught] + records.messages
    return [m for m in messages if not (m.startswith("No LoRA keys associated to ") and "prefix='text_encoder" in m)]


# the key each family's file has for peft's first block's to_q up weight (its scale folded in where there is no alpha)
FOLDED_UP = {"sd3": "transformer.{}", "sd35": "transformer.{}", "sana": "transformer.{}", "cogvideox": "transformer.{}",
             "qwen_image": "diffusion_model.{}", "ltx": "diffusion_model.{}"}  # fmt: skip
WAN_UP = "diffusion_model.blocks.0.self_attn.q.lora_B.weight"


def check_keys(family: str, state: dict, peft: dict) -> None:
    """The file's keys are the family's layout, with the student's scale (as alpha, or folded into the up weights)."""
    if family in ("sd15", "sdxl"):  # one kohya module per LoRA module, the student's alpha
        assert all(k.startswith("lora_unet_") for k in state) and len(state) == len(peft) // 2 * 3
        assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {float(ALPHA)}
    elif family in FOLDED_UP:  # diffusers names under `transformer.` or `diffusion_model.`, alpha / rank folded
        key = next(k for k in peft if k.endswith("to_q.lora_B.weight"))
        assert set(state) == {FOLDED_UP[family].format(k) for k in peft}
        assert torch.equal(state[FOLDED_UP[family].format(key)], peft[key] * (ALPHA / RANK))
    elif family.startswith("wan"):  # Wan's names, alpha / rank folded
        assert all(k.startswith("diffusion_model.") for k in state) and len(state) == len(peft)
        assert {"diffusion_model.head.head.lora_A.weight", "diffusion_model.time_projection.1.lora_A.weight",
                "diffusion_model.blocks.1.ffn.0.lora_A.weight"} <= set(state)  # fmt: skip
        assert torch.equal(state[WAN_UP], peft["blocks.0.attn1.to_q.lora_B.weight"] * (ALPHA / RANK))
    elif family == "zimage":  # Z-Image's names; q, k, v fused into attention_qkv, a rank-3r LoRA with alpha 3·8
        assert all(k.startswith("lora_unet_") for k in state)
        assert len(state) == 3 * (len(peft) // 2 - 2 * 4)  # 4 blocks, each q, k, v one module; 3 keys a module
        for blocks in ("layers_1", "noise_refiner_0", "context_refiner_0"):
            assert state[f"lora_unet_{blocks}_attention_qkv.lora_down.weight"].shape[0] == 3 * RANK
            assert state[f"lora_unet_{blocks}_attention_qkv.alpha"].item() == 3 * ALPHA
            assert state[f"lora_unet_{blocks}_feed_forward_w3.alpha"].item() == ALPHA
        assert {"lora_unet_layers_0_adaLN_modulation_0.alpha", "lora_unet_cap_embedder_1.alpha"} <= set(state)
    else:  # FLUX.1 / Chroma / FLUX.2 names; q, k, v fused into one rank-3r LoRA with alpha 3·8
        assert all(k.startswith("lora_unet_") for k in state)
        assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * RANK
        assert state["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * ALPHA
        assert state["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == ALPHA
        if family == "flux2":  # a single block's linear1 is one diffusers linear; layers outside the blocks too
            assert state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == RANK
            assert {"lora_unet_img_in.alpha", "lora_unet_final_layer_linear.alpha"} <= set(state)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_reloads_in_stock_diffusers_and_samples_as_the_student(family, tmp_path):
    teacher, student = lora_student(family, TARGETS.get(family))
    shape = latent_shape(teacher, 1)
    ours = stock_latents(teacher.pipeline, family, shape)  # the stock pipeline running the student's network
    with teacher.view():
        base = stock_latents(teacher.pipeline, family, shape)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must change the samples"

    path = save_kohya(student, teacher, tmp_path)
    assert path.name == KOHYA_WEIGHT_NAME
    state, peft = load_file(str(path)), lora_state_dict(student)
    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    assert load_reporting(pipe, path) == []
    if family == "wan22":  # one file per expert, each with Wan's names; the low-noise expert's loads into transformer_2
        with pytest.raises(ValueError, match=r"is 2 files .* one per expert: use kohya_files or save_kohya"):
            kohya_state_dict(student, teacher)
        second = tmp_path / KOHYA_TRANSFORMER_2_WEIGHT_NAME
        low = load_file(str(second))
        check_keys(family, low, {k.removeprefix("low."): v for k, v in peft.items() if k.startswith("low.")})
        peft = {k.removeprefix("high."): v for k, v in peft.items() if k.startswith("high.")}
        alone = (stock_latents(pipe, family, shape) - ours).abs().max().item()
        assert alone > 1e-3, "transformer_2's LoRA must change the samples"
        assert load_reporting(pipe, second, load_into_transformer_2=True) == []
    check_keys(family, state, peft)
    diff = (stock_latents(pipe, family, shape) - ours).abs().max().item()
    print(f"{family} kohya LoRA in stock diffusers: max |Δ latents| = {diff:.2e}")
    assert diff < TOLERANCE


def flux1_wide_single_block(family: str):
    """A FLUX.1-wide transformer of ``family`` (24 heads of 128: 3072; one single block, no double block; Chroma's
    approximator narrow) with the tiny encoders and VAE, and the single block's LoRA targets (its modulation linear
    for FLUX.1; Chroma has none)."""
    import diffusers

    from fewstep.testing import build_tiny_pipeline

    tiny = build_tiny_pipeline(family)
    torch.manual_seed(0)
    wide = dict(patch_size=1, in_channels=16, joint_attention_dim=32, axes_dims_rope=(16, 56, 56), num_layers=0,
                num_single_layers=1, attention_head_dim=128, num_attention_heads=24)  # fmt: skip
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]  # proj_mlp: a zero block
    if family == "flux":
        transformer = diffusers.FluxTransformer2DModel(pooled_projection_dim=32, guidance_embeds=True, **wide)
        targets.append("norm.linear")
    else:
        transformer = diffusers.ChromaTransformer2DModel(approximator_num_channels=16, approximator_hidden_dim=32,
                                                         approximator_layers=1, **wide)  # fmt: skip
    return type(tiny)(**{**tiny.components, "transformer": transformer}), targets


@pytest.mark.parametrize(("family", "layout"), [("flux", FLUX1), ("chroma", CHROMA)])
def test_flux1_single_blocks_fuse_into_linear1_at_flux1_widths(family, layout, tmp_path):
    """A single block's q, k, v (and proj_mlp) are one linear in FLUX.1 and Chroma; diffusers splits it at FLUX.1's
    widths, so this runs a FLUX.1-wide transformer."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe, targets = flux1_wide_single_block(family)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[f"single_transformer_blocks.0.{t}"
                                                                                 for t in targets]))  # fmt: skip
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    widths = [transformer.get_submodule(f"single_transformer_blocks.0.{p}").out_features
              for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]  # fmt: skip
    assert tuple(widths) == FLUX1_LINEAR1_WIDTHS
    shape = (1, 4, 8, 8)  # 16 image tokens
    ours = stock_latents(pipe, family, shape)

    state = fused_kohya_state_dict(get_peft_model_state_dict(transformer), RANK, ALPHA,
                                   lambda path: transformer.get_submodule(path).out_features, layout)  # fmt: skip
    names = ("linear1", "linear2", "modulation_lin") if family == "flux" else ("linear1", "linear2")
    suffixes = ("alpha", "lora_down.weight", "lora_up.weight")
    assert sorted(state) == sorted(f"lora_unet_single_blocks_0_{n}.{s}" for n in names for s in suffixes)
    assert state["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * ALPHA
    path = tmp_path / KOHYA_WEIGHT_NAME
    save_file(state, str(path))
    transformer.delete_adapters("default")
    assert (stock_latents(pipe, family, shape) - ours).abs().max() > 1e-3, "without the LoRA the samples differ"
    assert load_reporting(pipe, path) == []
    diff = (stock_latents(pipe, family, shape) - ours).abs().max().item()
    print(f"{layout.name}-wide single block kohya LoRA: max |Δ latents| = {diff:.2e}")
    assert diff < TOLERANCE


def test_what_the_flux_layout_cannot_hold_is_an_error_naming_it(tmp_path):
    teacher, student = lora_student("flux")  # default targets: the single block's q, k, v at the tiny width 32
    with pytest.raises(ValueError, match=r"widths \(32, 32, 32, 128\); diffusers' reader splits it at FLUX.1's"):
        save_kohya(student, teacher, tmp_path)
    teacher, student = lora_student("flux", ["x_embedder", "transformer_blocks.0.attn.to_q"])
    with pytest.raises(ValueError, match=r"cannot load these LoRA modules back: \['x_embedder'\]"):
        save_kohya(student, teacher, tmp_path)
    assert not (tmp_path / KOHYA_WEIGHT_NAME).exists()


@pytest.mark.parametrize(
    ("family", "targets", "message"),
    [
        ("flux2", ["norm_out.linear", "transformer_blocks.0.attn.to_q"],
         r"kohya FLUX.2 keys: .* back: \['norm_out.linear'\] \(it maps the blocks' attention and MLPs"),
        ("ltx", ["proj_in", "to_q"], r"kohya ltx keys: .* back: \['proj_in'\] \(it keeps the names as they are"),
        ("chroma", ["distilled_guidance_layer.in_proj", "transformer_blocks.0.attn.to_q"],
         r"kohya Chroma keys: .* back: \['distilled_guidance_layer.in_proj'\] \(diffusers reads Chroma with its"),
        ("chroma", None, r"widths \(32, 32, 32, 128\); diffusers' reader splits it at Chroma's \(3072, 3072, 3072"),
        ("zimage", ["all_x_embedder.2-1", "all_final_layer.2-1.linear", "to_q"],
         r"kohya Z-Image keys: .* back: \['all_x_embedder.2-1', 'all_final_layer.2-1.linear'\] \(it maps the layers'"),
        ("wan21_i2v", ["to_q", "add_k_proj"], r"cross_attn.k_img \(attn2.add_k_proj / add_v_proj\) without its"),
        ("pixart_sigma", None, r"PixArtSigmaPipeline has no LoRA loader in diffusers.*export.merged: true"),
        ("hunyuan15", None, r"HunyuanVideo15Pipeline has no LoRA loader in diffusers.*export.merged: true"),
    ],
)  # fmt: skip
def test_what_a_layout_cannot_hold_is_an_error_naming_it(family, targets, message, tmp_path):
    teacher, student = lora_student(family, targets)
    with pytest.raises(ValueError, match=message):
        save_kohya(student, teacher, tmp_path)
    assert not (tmp_path / KOHYA_WEIGHT_NAME).exists()


def test_wan22_export_has_one_kohya_file_per_expert_and_its_card_names_both(tmp_path):
    teacher, student = lora_student("wan22")
    objective = DMD2(DMD2Config(num_student_steps=4, health_reference_steps=0), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export", kohya=True)
    high, low = load_file(str(out / KOHYA_WEIGHT_NAME)), load_file(str(out / KOHYA_TRANSFORMER_2_WEIGHT_NAME))
    assert high.keys() == low.keys() and not torch.equal(high[WAN_UP], low[WAN_UP])
    assert f"`{KOHYA_TRANSFORMER_2_WEIGHT_NAME}` is `transformer_2`'s" in (out / "README.md").read_text()


def test_per_layer_ranks_are_refused(tmp_path):
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd15"))
    student = Student.lora(teacher, rank=RANK, alpha=ALPHA)
    student.denoiser.backbone.peft_config["default"].rank_pattern = {"to_q": 8}
    with pytest.raises(ValueError, match="one rank and alpha for every layer"):
        save_kohya(student, teacher, tmp_path)
