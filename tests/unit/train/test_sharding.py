"""The FSDP2 layout a run gets (from ``train.fsdp`` or an FSDP2 accelerate launch) and what it shards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from fewstep.config import validate_recipe
from fewstep.config.schema import FSDPConfig
from fewstep.objectives.dmd.gan import GANHead
from fewstep.train.build import build_components
from fewstep.train.sharding import block_classes, fsdp_layout, is_backbone, sharding_roots


def launch(plugin=None, processes=2, device="cuda", replicate=None):
    """What the trainer reads of an accelerator: processes, device, the FSDP plugin of an FSDP launch."""
    kind = "DistributedType.FSDP" if plugin is not None else "DistributedType.MULTI_GPU"
    parallelism = SimpleNamespace(dp_replicate_size=replicate) if replicate else None
    return SimpleNamespace(num_processes=processes, distributed_type=kind, device=torch.device(device),
                           state=SimpleNamespace(fsdp_plugin=plugin), parallelism_config=parallelism)  # fmt: skip


def test_an_fsdp2_launch_config_gives_its_layout_and_the_recipe_block_wins():
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=False, cpu_offload=True, activation_checkpointing=True
    )
    layout = fsdp_layout(None, launch(plugin))
    assert (layout.reshard_after_forward, layout.cpu_offload, layout.activation_checkpointing) == (False, True, True)
    assert layout.replicate == 1 and layout.param_dtype is None  # precision: autocast, as every run
    assert fsdp_layout(None, launch(plugin, processes=4, replicate=2)).replicate == 2
    assert fsdp_layout(None, launch()) is None  # DDP
    recipe_block = fsdp_layout(FSDPConfig(replicate=2), launch(plugin))
    assert recipe_block.reshard_after_forward and not recipe_block.cpu_offload and recipe_block.replicate == 2
    assert fsdp_layout(FSDPConfig(enabled=False), launch()) is None


def test_layouts_fewstep_cannot_run_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="FSDP version 1.*fsdp_version: 2"):
        fsdp_layout(None, launch(FullyShardedDataParallelPlugin(fsdp_version=1)))
    with pytest.raises(ValueError, match="divisible.*has 3"):
        fsdp_layout(FSDPConfig(replicate=2), launch(processes=3))
    with pytest.raises(ValueError, match="cpu_offload=true.*on CPUs"):
        fsdp_layout(FSDPConfig(cpu_offload=True), launch(device="cpu"))


def dmd2(tmp_path, kind: str):
    return validate_recipe({
        "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
        "student": {"kind": kind, **({"lora": {"rank": 4}} if kind == "lora" else {})},
        "objective": {"name": "dmd2", "fake_score": kind, "gan_weight": 1e-2, "health_reference_steps": 0},
        "data": {"source": "digits", "batch_size": 2},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip


def test_roots_are_each_backbone_once_and_the_parts_with_weights_of_their_own(tmp_path):
    lora = build_components(dmd2(tmp_path, "lora"))
    backbone = lora.teacher.denoiser.backbone
    roots = sharding_roots(lora.objective.trainable(), backbone)
    # the student's and the fake score's adapters live in the teacher's backbone: only the GAN head is its own
    assert roots[0] is backbone and len(roots) == 2 and isinstance(roots[1], GANHead)

    full = build_components(dmd2(tmp_path, "full"))
    roots = sharding_roots(full.objective.trainable(), full.teacher.denoiser.backbone)
    backbones = [r for r in roots if is_backbone(r)]
    assert len(backbones) == 3 and len({id(r) for r in backbones}) == 3  # teacher, student, fake score copy
    assert full.student.denoiser.backbone in backbones  # the model itself, not the Student wrapped around it
    assert sum(isinstance(r, GANHead) for r in roots) == 1
    assert block_classes(backbone) == ("ResnetBlock2D", "Attention")  # UNet2DModel declares none: the fallback


def test_diffusers_blocks_are_the_units():
    from diffusers import FluxTransformer2DModel

    assert block_classes(FluxTransformer2DModel) == ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def test_periodic_evaluation_with_sharding_is_refused_by_validate(tmp_path):
    from fewstep.config.errors import RecipeError

    data = dmd2(tmp_path, "lora").model_dump(mode="json")
    data["train"]["fsdp"] = {"enabled": True}
    data["eval"]["every_steps"] = 100
    with pytest.raises(RecipeError, match=r"eval\.every_steps: cannot be used with train\.fsdp"):
        validate_recipe(data)
    data["eval"]["every_steps"] = None
    assert validate_recipe(data).train.fsdp.enabled
