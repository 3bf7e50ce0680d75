"""ComfyUI / kohya LoRA files for every family, read back by stock diffusers: ``pipe.load_lora_weights(file)`` detects
the layout, converts it without a warning, and the pipeline then samples what the student's own network samples in
the same pipeline (same latents, same steps) to float rounding."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.export import KOHYA_WEIGHT_NAME, lora_state_dict, save_kohya
from fewstep.export.kohya import FLUX1_LINEAR1_WIDTHS, flux_kohya_state_dict
from fewstep.models.backbones import latent_shape, pack_latents
from fewstep.models.loading import load_teacher
from fewstep.models.student import DEFAULT_LORA_TARGETS, Student
from tests.helpers import move_lora_away, single_thread  # noqa: F401 (fixture)

TOLERANCE = 1e-5
RANK, ALPHA = 4, 8  # alpha ≠ rank: a file that lost the scale samples visibly differently
# Flux's double blocks only: a single block's fused linear1 is split by diffusers at FLUX.1's widths (see below)
FLUX_DOUBLE_BLOCKS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|norm1\.linear|norm1_context\.linear)"
)
TARGETS = {"sd15": DEFAULT_LORA_TARGETS["unet"], "sdxl": DEFAULT_LORA_TARGETS["unet"], "sd3": None,
           "flux": FLUX_DOUBLE_BLOCKS}  # fmt: skip


def lora_student(family: str, targets=None) -> tuple:
    """A tiny teacher and a rank-4, alpha-8 LoRA student with random (non-zero) up weights."""
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    torch.manual_seed(0)
    student = Student.lora(teacher, rank=RANK, alpha=ALPHA, target_modules=targets)
    move_lora_away(student)
    return teacher, student


def stock_latents(pipe, shape: tuple[int, ...], flux: bool) -> torch.Tensor:
    """The pipeline's output latents for fixed initial latents ``[1, c, h, w]``, prompt and re-noise seed (2 steps,
    the pipeline's own CFG)."""
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    size = {"height": shape[-2] * pipe.vae_scale_factor, "width": shape[-1] * pipe.vae_scale_factor}
    if flux:
        latents = pack_latents(latents)  # [1, tokens, 4c]
        size["max_sequence_length"] = 8  # T5 tokens (512 by default)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(2)  # pipelines that do not pass `generator` to scheduler.step draw from the global RNG
    return pipe("a red circle", latents=latents, num_inference_steps=2, output_type="latent", **size,
                generator=torch.Generator().manual_seed(2)).images  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_reporting(pipe, path) -> list[str]:
    """``pipe.load_lora_weights(path)``; returns every warning it raised or logged, except diffusers' notice that the
    text encoders got no LoRA keys (fewstep trains the backbone only)."""
    records = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    finally:
        logger.removeHandler(records)
    messages = [str(w.message) for w in caught] + records.messages
    return [
        m for m in messages if not (m.startswith("No LoRA keys associated to CLIPTextModel") and "text_encoder" in m)
    ]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_kohya_file_reloads_in_stock_diffusers_and_samples_as_the_student(family, tmp_path):
    teacher, student = lora_student(family, TARGETS[family])
    shape, flux = latent_shape(teacher, 1), family == "flux"
    ours = stock_latents(teacher.pipeline, shape, flux)  # the stock pipeline running the student's network
    with teacher.view():
        base = stock_latents(teacher.pipeline, shape, flux)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must change the samples"

    path = save_kohya(student, teacher, tmp_path)
    assert path.name == KOHYA_WEIGHT_NAME
    state, peft = load_file(str(path)), lora_state_dict(student)
    if family in ("sd15", "sdxl"):  # one kohya module per LoRA module, the student's alpha
        assert all(k.startswith("lora_unet_") for k in state) and len(state) == len(peft) // 2 * 3
        assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {float(ALPHA)}
    elif family == "sd3":  # diffusers keys, alpha / rank folded into the up weights
        key = "transformer_blocks.0.attn.to_q.lora_B.weight"
        assert set(state) == {f"transformer.{k}" for k in peft}
        assert torch.equal(state[f"transformer.{key}"], peft[key] * (ALPHA / RANK))
    else:  # FLUX.1 names; q, k, v fused into one rank-3r LoRA with alpha 3·8
        assert all(k.startswith("lora_unet_double_blocks_0_") for k in state)
        assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * RANK
        assert state["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * ALPHA
        assert state["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == ALPHA

    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    assert load_reporting(pipe, path) == []
    diff = (stock_latents(pipe, shape, flux) - ours).abs().max().item()
    print(f"{family} kohya LoRA in stock diffusers: max |Δ latents| = {diff:.2e}")
    assert diff < TOLERANCE


def test_flux_single_blocks_fuse_into_linear1_at_flux1_widths(tmp_path):
    """A single block's q, k, v (and proj_mlp) are one linear in FLUX.1; diffusers splits it at FLUX.1's widths, so
    this runs a FLUX.1-wide transformer (one single block, no double block) with the tiny encoders and VAE."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    from fewstep.testing import build_tiny_pipeline

    tiny = build_tiny_pipeline("flux")
    torch.manual_seed(0)
    wide = dict(num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24)  # 24·128 = 3072
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=True, axes_dims_rope=(16, 56, 56), **wide)  # fmt: skip
    pipe = FluxPipeline(**{**tiny.components, "transformer": transformer})
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out", "norm.linear"]  # proj_mlp: a zero block
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
    ours = stock_latents(pipe, shape, True)

    state = flux_kohya_state_dict(get_peft_model_state_dict(transformer), RANK, ALPHA,
                                  lambda path: transformer.get_submodule(path).out_features)  # fmt: skip
    names = ("linear1", "linear2", "modulation_lin")
    suffixes = ("alpha", "lora_down.weight", "lora_up.weight")
    assert sorted(state) == sorted(f"lora_unet_single_blocks_0_{n}.{s}" for n in names for s in suffixes)
    assert state["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * ALPHA
    path = tmp_path / KOHYA_WEIGHT_NAME
    save_file(state, str(path))
    transformer.delete_adapters("default")
    assert (stock_latents(pipe, shape, True) - ours).abs().max() > 1e-3, "without the LoRA the samples differ"
    assert load_reporting(pipe, path) == []
    diff = (stock_latents(pipe, shape, True) - ours).abs().max().item()
    print(f"FLUX.1-wide single block kohya LoRA: max |Δ latents| = {diff:.2e}")
    assert diff < TOLERANCE


def test_what_the_flux_layout_cannot_hold_is_an_error_naming_it(tmp_path):
    teacher, student = lora_student("flux")  # default targets: the single block's q, k, v at the tiny width 32
    with pytest.raises(ValueError, match=r"widths \(32, 32, 32, 128\); diffusers' reader splits it at FLUX.1's"):
        save_kohya(student, teacher, tmp_path)
    teacher, student = lora_student("flux", ["x_embedder", "transformer_blocks.0.attn.to_q"])
    with pytest.raises(ValueError, match=r"cannot load these LoRA modules back: \['x_embedder'\]"):
        save_kohya(student, teacher, tmp_path)
    assert not (tmp_path / KOHYA_WEIGHT_NAME).exists()


def test_per_layer_ranks_are_refused(tmp_path):
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd15"))
    student = Student.lora(teacher, rank=RANK, alpha=ALPHA)
    student.denoiser.backbone.peft_config["default"].rank_pattern = {"to_q": 8}
    with pytest.raises(ValueError, match="one rank and alpha for every layer"):
        save_kohya(student, teacher, tmp_path)
