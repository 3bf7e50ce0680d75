"""The shipped architecture configs: their backbones have the published sizes, every shipped recipe whose teacher is
a Hub id plans from them, and planning a real recipe on them takes seconds with no weights and no network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.config.load import list_recipes, load_recipe
from fewstep.models.backbones import pipeline_backbone
from fewstep.models.loading import is_hub_id, resolve_pretrained
from fewstep.plan import layout_by_name, plan_recipe
from fewstep.plan.meta import meta_pipeline
from fewstep.plan.sources import config_directory, shipped_models

# Backbone parameters as published: Stable Diffusion's 860 M UNet, the SDXL report's 2.6 B UNet, SD3 Medium's 2 B,
# FLUX.1's 12 B (11.9 B on its Hub page), SD3.5 Large's 8.1 B, Wan 2.1 14B's 28.6 GB of bf16 weights (14.3 B) and
# Qwen-Image's 20.4 B MMDiT (its Hub page). Wan 2.1 1.3B: 1.42 B, the 5.68 GB fp32 transformer of its Hub repo (the
# card's "1.3B" rounds it down). Wan 2.1 I2V 14B: 16.39 B, the count of its transformer config (the T2V 14B transformer
# plus the CLIP image projection and each layer's image key/value projections, 40 · 2 · 5120² = 2.1 B; the card's
# "14B" names the family). Wan 2.2 T2V-A14B: two experts of 14.3 B each, the Wan 2.1 14B architecture (the card's
# "27B total, 14B active"); each expert is checked. Wan 2.2 TI2V-5B's 5 B, LTX-Video's 2 B model as the diffusers
# repo holds it (0.9.x: 1.92 B), PixArt-Σ's 0.6 B (2.44 GB of fp32 weights, 611 M), Sana 1600M's 1.6 B.
PUBLISHED = {
    "runwayml/stable-diffusion-v1-5": 860e6,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 860e6,
    "stabilityai/stable-diffusion-3-medium-diffusers": 2.0e9,
    "stabilityai/stable-diffusion-xl-base-1.0": 2.6e9,
    "black-forest-labs/FLUX.1-dev": 11.9e9,
    "stabilityai/stable-diffusion-3.5-large": 8.1e9,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": 14.3e9,
    "Qwen/Qwen-Image": 20.4e9,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": 1.42e9,
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": 16.39e9,
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": 14.3e9,  # per expert
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": 5.0e9,
    "Lightricks/LTX-Video": 1.92e9,
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": 611e6,
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": 1.6e9,
}


def denoisers(pipe) -> dict[str, nn.Module]:
    """The pipeline's denoising networks: its backbone, and Wan 2.2's low-noise expert ``transformer_2``."""
    nets = {"backbone": pipeline_backbone(pipe)}
    if getattr(pipe, "transformer_2", None) is not None:
        nets["transformer_2"] = pipe.transformer_2
    return nets


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Hub teachers of shipped recipes whose architecture configs do not ship yet (the families are new; their configs
# could not be read offline to be checked): planning them needs the model in the local Hugging Face cache.
NOT_SHIPPED = {
    "black-forest-labs/FLUX.2-dev",
    "THUDM/CogVideoX-5b",
    "lodestones/Chroma1-HD",
    "Tongyi-MAI/Z-Image",
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v",
}


def hub_teacher_recipes() -> list[str]:
    """The shipped recipes whose teacher is a Hub id (not a local directory or a packaged teacher) with shipped
    configs."""
    return [
        name
        for name in list_recipes()
        if is_hub_id(hub_id := resolve_pretrained(load_recipe(name).teacher.pretrained)) and hub_id not in NOT_SHIPPED
    ]


def test_only_the_listed_hub_teachers_lack_shipped_configs():
    teachers = {resolve_pretrained(load_recipe(name).teacher.pretrained) for name in list_recipes()}
    missing = {t for t in teachers if is_hub_id(t) and config_directory_or_none(t) is None}
    assert missing == NOT_SHIPPED


def config_directory_or_none(hub_id: str):
    try:
        directory, where = config_directory(hub_id)
    except FileNotFoundError:
        return None
    return directory if where == "shipped" else None


def test_every_shipped_config_is_checked():
    assert sorted(PUBLISHED) == shipped_models()


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_backbone_has_the_published_size(hub_id):
    directory, where = config_directory(hub_id)
    assert where == "shipped"
    pipe = meta_pipeline(directory, torch.bfloat16)
    nets = denoisers(pipe)
    assert len(nets) == (2 if hub_id == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" else 1)
    for net in nets.values():
        assert numel(net) == pytest.approx(PUBLISHED[hub_id], rel=0.02)
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", hub_teacher_recipes())
def test_every_hub_teacher_recipe_plans_from_its_shipped_configs(name):
    """Every shipped recipe naming a Hub teacher plans offline on 8 GPUs, its frozen teacher exactly the shipped
    config's denoisers (both of Wan 2.2's experts)."""
    recipe = load_recipe(name)
    directory, where = config_directory(recipe.teacher.pretrained)
    assert where == "shipped", f"{name}: no shipped configs for {recipe.teacher.pretrained}"
    plan = plan_recipe(recipe, world_size=8)
    teacher = {r.name: r for r in plan.roles}["teacher"]
    expected = sum(numel(net) for net in denoisers(meta_pipeline(directory, torch.bfloat16)).values())
    assert teacher.kind == "frozen" and teacher.params.numel == expected
    assert plan.activations[False].num_blocks > 0  # the example forward ran through the backbone's blocks


def test_flux_dmd2_lora_plan():
    """FLUX.1-dev DMD2 LoRA on 8 GPUs: the frozen base once in bf16, two rank-64 fp32 adapters, T5 on every rank."""
    plan = plan_recipe(load_recipe("dmd/flux_dmd2_lora"), world_size=8)
    roles = {r.name: r for r in plan.roles}
    assert roles["teacher"].params.numel == pytest.approx(11.9e9, rel=0.01)
    assert roles["teacher"].params.bytes == 2 * roles["teacher"].params.numel
    assert roles["student"].params.numel == roles["fake_score"].params.numel
    assert roles["text_encoder_2"].kind == "encoder"
    assert plan.shape.resolution == 1024 and plan.shape.text_tokens == 512
    ddp, full = layout_by_name(plan, "ddp+ckpt"), layout_by_name(plan, "fsdp2_full_shard+ckpt")
    assert full.persistent["frozen weights"] == pytest.approx(ddp.persistent["frozen weights"] / 8, rel=1e-6)
    assert full.persistent["encoders, VAE, buffers"] == ddp.persistent["encoders, VAE, buffers"]
    assert plan.recommended is not None


def test_wan_and_qwen_plan_from_their_configs(tmp_path):
    for hub_id, family in (("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan21"), ("Qwen/Qwen-Image", "qwen_image")):
        overrides = [f"teacher.pretrained={hub_id}", "data.resolution=512", "student.lora.target_modules=[to_q,to_v]"]
        recipe = load_recipe("dmd/flux_dmd2_lora", overrides)
        plan = plan_recipe(recipe, world_size=8, frames=17)
        assert plan.models.family == family and not any("no backbone adapter" in n for n in plan.notes)
        assert (
            plan.activations[False].coefficients_of == type(plan.models.components.teacher.denoiser.backbone).__name__
        )
        assert layout_by_name(plan, "ddp").total_bytes > layout_by_name(plan, "fsdp2_full_shard").total_bytes


def test_video_plans_take_the_recipes_frame_count():
    """LTX rCM trains on 161-frame clips: the plan is made at that length unless --frames says otherwise."""
    recipe = load_recipe("consistency/ltx_rcm_lora")
    assert recipe.data.num_frames == 161
    assert plan_recipe(recipe, world_size=8).shape.frames == 161
    assert plan_recipe(recipe, world_size=8, frames=81).shape.frames == 81
