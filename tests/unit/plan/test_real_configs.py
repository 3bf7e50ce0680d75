"""The shipped architecture configs: their backbones have the published sizes, and planning a real recipe on them
takes seconds with no weights and no network."""

from __future__ import annotations

import pytest
import torch

from fewstep.config.load import load_recipe
from fewstep.models.backbones import pipeline_backbone
from fewstep.plan import layout_by_name, plan_recipe
from fewstep.plan.meta import meta_pipeline
from fewstep.plan.sources import config_directory, shipped_models

# Backbone parameters as published: Stable Diffusion's 860 M UNet, the SDXL report's 2.6 B UNet, SD3 Medium's 2 B,
# FLUX.1's 12 B (11.9 B on its Hub page), SD3.5 Large's 8.1 B, Wan 2.1 14B's 28.6 GB of bf16 weights (14.3 B) and
# Qwen-Image's 20.4 B MMDiT (its Hub page).
PUBLISHED = {
    "runwayml/stable-diffusion-v1-5": 860e6,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 860e6,
    "stabilityai/stable-diffusion-3-medium-diffusers": 2.0e9,
    "stabilityai/stable-diffusion-xl-base-1.0": 2.6e9,
    "black-forest-labs/FLUX.1-dev": 11.9e9,
    "stabilityai/stable-diffusion-3.5-large": 8.1e9,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": 14.3e9,
    "Qwen/Qwen-Image": 20.4e9,
}


def test_every_shipped_config_is_checked():
    assert sorted(PUBLISHED) == shipped_models()


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_backbone_has_the_published_size(hub_id):
    directory, where = config_directory(hub_id)
    assert where == "shipped"
    pipe = meta_pipeline(directory, torch.bfloat16)
    backbone = pipeline_backbone(pipe)
    count = sum(p.numel() for p in backbone.parameters())
    assert count == pytest.approx(PUBLISHED[hub_id], rel=0.02)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in backbone.parameters())


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
