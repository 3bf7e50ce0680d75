"""SD3.5 export: a DMD2 LoRA student on the tiny ``sd35`` teacher (RMS q/k norms and dual attention carry LoRA layers
too) loads in the stock ``StableDiffusion3Pipeline`` with ``load_lora_weights`` and, with the exported scheduler,
reproduces the student's 1, 2 and 4 step samples."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, max_diff_to_student, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


def test_stock_sd3_pipeline_reproduces_the_sd35_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd35"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=3.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.recommended_steps == 4
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert any(".attn2." in k for k in keys), "the dual (image-only) attention of SD3.5 Medium is trained too"
    assert not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    diff = max_diff_to_student(objective, pipe, spec, cond, shape)
    print(f"sd35 DMD2 LoRA: max |stock − fewstep| = {diff:.2e}")
    assert diff < TOLERANCE
