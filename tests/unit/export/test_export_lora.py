"""Export acceptance: a stock diffusers pipeline loaded from the export reproduces fewstep's own student samples."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors import safe_open

from fewstep.export import (
    KOHYA_WEIGHT_NAME,
    WEIGHT_NAME,
    export_run,
    export_student,
    lora_state_dict,
    read_schedule,
    save_lora,
)
from fewstep.models.backbones import latent_shape
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import DEFAULT_LORA_TARGETS, Student
from fewstep.objectives.consistency.lcm import LCM, LCMConfig
from fewstep.objectives.protocol import Batch
from tests.helpers import (
    RELOAD,
    TOLERANCE,
    max_diff_to_student,
    move_lora_away,
    single_thread,  # noqa: F401 (fixture)
)


def trained_student(family: str, kind: str = "lora", guidance_embedding: bool = False, steps: int = 2):
    """A tiny teacher, a student trained a few LCM steps with a large LR (so its weights are far from init)."""
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    if kind == "lora":  # UNets: LCM-LoRA's targets, convs included (conv LoRA must survive the round trip too)
        targets = DEFAULT_LORA_TARGETS["unet"] if family != "sd3" else None
        student = Student.lora(teacher, rank=4, alpha=8, target_modules=targets)
    else:
        student = Student.full(teacher)
    objective = LCM(LCMConfig(w_min=1.0, w_max=3.0, guidance_embedding=guidance_embedding), teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, "student")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        objective.on_step_end(step, "student")
    return teacher, student, objective, cond, shape


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_stock_pipeline_with_exported_lora_reproduces_the_student(family, tmp_path):
    teacher, student, objective, cond, shape = trained_student(family)
    unet = family != "sd3"
    out = export_student(student, teacher, objective, tmp_path / "export", merged=family == "sd15", kohya=unet)
    spec = read_schedule(out)
    expected_scheduler = "LCMScheduler" if family != "sd3" else "FlowMatchEulerDiscreteScheduler"
    assert spec.scheduler_class == expected_scheduler and spec.guidance_scale == 1.0

    # Every key of the file is one of the student's LoRA tensors, with its value; lora_alpha survives.
    component = "transformer" if family == "sd3" else "unet"
    state = lora_state_dict(student)
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
        assert keys == {f"{component}.{k}" for k in state}
        for k, v in state.items():
            assert torch.equal(f.get_tensor(f"{component}.{k}"), v)
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata[f"{component}.lora_alpha"] == 8 and metadata[f"{component}.r"] == 4
    assert any(not torch.all(v == 0) for k, v in state.items() if "lora_B" in k)  # trained, not the zero init

    pipe_cls = type(teacher.pipeline)
    pipe = pipe_cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True, **RELOAD.get(family, {}))
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    diff = max_diff_to_student(objective, pipe, spec, cond, shape)
    print(f"{family} LoRA: max |stock − fewstep| = {diff:.2e}")
    assert diff < TOLERANCE

    if unet:  # kohya / ComfyUI keys: diffusers reads them too; alpha 8 ≠ rank 4 checks the scale survives
        with safe_open(str(out / KOHYA_WEIGHT_NAME), "pt") as f:
            assert all(k.startswith("lora_unet_") for k in f.keys())
            assert {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")} == {8.0}
        pipe = pipe_cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
        pipe.load_lora_weights(str(out), weight_name=KOHYA_WEIGHT_NAME)
        pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
        diff = max_diff_to_student(objective, pipe, spec, cond, shape)
        print(f"{family} kohya LoRA: max |stock − fewstep| = {diff:.2e}")
        assert diff < TOLERANCE

    if family == "sd15":  # merged pipeline, scheduler included
        merged = pipe_cls.from_pretrained(str(out / "merged"), local_files_only=True)
        assert type(merged.scheduler).__name__ == "LCMScheduler"
        diff = max_diff_to_student(objective, merged, spec, cond, shape)
        print(f"{family} merged: max |stock − fewstep| = {diff:.2e}")
        assert diff < TOLERANCE


def test_full_lcm_with_guidance_embedding_exports_a_pipeline(tmp_path):
    teacher, student, objective, cond, shape = trained_student("sd15", kind="full", guidance_embedding=True)
    out = export_student(student, teacher, objective, tmp_path / "full")
    assert not (out / WEIGHT_NAME).exists() and (out / "model_index.json").is_file()
    spec = read_schedule(out)
    assert spec.guidance_scale == 4.0  # LCM's pipeline default w = 8.5, clamped into the trained 1 + ω ∈ [2, 4]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.time_cond_proj_dim == 256
    diff = max_diff_to_student(objective, pipe, spec, cond, shape)
    print(f"full LCM (ω-embedding): max |stock − fewstep| = {diff:.2e}")
    assert diff < TOLERANCE


def test_model_card_snippet_runs_and_states_the_convention(tmp_path):
    teacher, student, objective, _, _ = trained_student("sd15", steps=1)
    out = export_student(student, teacher, objective, tmp_path / "card", base_model=teacher.pipeline.name_or_path)
    card = (out / "README.md").read_text()
    assert "guidance_scale: **1.0**" in card and "ω = w − 1" in card and "steps: **4**" in card
    assert "load_lora_weights" in card and "LCMScheduler" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the snippet as a user would paste it
    assert scope["image"].size[0] > 0


def test_pixel_pipeline_without_lora_loader_falls_back_to_merged(tmp_path):
    """DDPMPipeline has no LoRA loader: the export is a merged pipeline with the LCMScheduler, and the stock
    DDPMPipeline (which draws its own noise from the generator) reproduces the student."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    teacher = load_teacher(SimpleNamespace(pretrained=str(tmp_path / "ddpm")))
    student = Student.lora(teacher, rank=2)
    objective = LCM(LCMConfig(w_min=0.0, w_max=0.0), teacher, student)
    move_lora_away(student)  # non-trivial adapter weights
    with pytest.raises(ValueError, match="export.merged"):
        save_lora(student, teacher, tmp_path / "lora")
    out = export_student(student, teacher, objective, tmp_path / "px")
    pipe = DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for num_steps in (1, 2, 4):
        generator = torch.Generator().manual_seed(num_steps)
        noise = torch.randn((2, 1, 8, 8), generator=generator)
        ours = objective.sampler()(noise, Conditioning(), num_steps, generator)
        images = pipe(batch_size=2, num_inference_steps=num_steps, output_type="np",
                      generator=torch.Generator().manual_seed(num_steps)).images  # fmt: skip
        ref = torch.from_numpy(images).permute(0, 3, 1, 2)
        assert (ref - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() < TOLERANCE


def test_export_run_exports_the_newest_checkpoint(tmp_path):
    """Train the shipped LCM-LoRA recipe 2 steps on the tiny SD1.5 (checkpoint every step), export the run, and find
    the newest checkpoint's adapters in the LoRA file; the card and the scheduler config come with it."""
    import numpy as np
    from PIL import Image

    from fewstep.config.load import load_recipe
    from fewstep.train.checkpoint import latest_checkpoint, load_trainable_weights
    from fewstep.train.loop import train

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"noise {i}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    overrides = [
        "teacher.pretrained=tiny:sd15", f"data.path={images}", "data.resolution=32", "data.batch_size=2",
        "data.num_workers=0", "student.lora.rank=4", "student.gradient_checkpointing=false", "optim.warmup_steps=0",
        "optim.lr_scheduler=constant", "optim.lr=1e-2", "train.max_steps=2", "train.checkpoint_every=1",
        "train.sample_every=null", "train.mixed_precision=no", "train.progress=false", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run = train(load_recipe("lcm/sd15_lcm_lora", overrides))
    newest = latest_checkpoint(run)
    assert newest is not None and newest.name.endswith("2")
    out = export_run(run, tmp_path / "export")
    assert {"README.md", "fewstep_student.json", WEIGHT_NAME, "scheduler"} <= {p.name for p in out.iterdir()}
    assert read_schedule(out).scheduler_class == "LCMScheduler"
    ckpt = load_trainable_weights(newest)["student"]
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        assert len(f.keys()) == len(ckpt)
        for name, value in ckpt.items():
            key = "unet." + name.removeprefix("denoiser.backbone.").replace(".default.", ".")
            assert torch.equal(f.get_tensor(key), value), key


def test_export_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="resolved_config.yaml"):
        export_run(tmp_path)
    (tmp_path / "resolved_config.yaml").write_text("output_dir: x\n")
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        export_run(tmp_path)
