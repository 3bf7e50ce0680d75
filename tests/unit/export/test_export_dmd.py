"""DMD2 export: the student's LoRA (adapter ``default``, next to the fake score's adapter on the same base) reloads in
a stock diffusers pipeline whose scheduler reproduces the student's DMD sampler (LCMScheduler on DMD2's timesteps for
VP, stochastic FlowMatchEuler for flow)."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import RELOAD, TOLERANCE, max_diff_to_student, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_stock_pipeline_reproduces_the_dmd2_lora_student(family, tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=3.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == ("LCMScheduler" if family == "sdxl" else "FlowMatchEulerDiscreteScheduler")
    assert spec.guidance_scale == 1.0 and spec.recommended_steps == 4 and spec.objective == "dmd2"
    if family == "sdxl":
        assert spec.steps[4]["timesteps"] == [999, 749, 499, 249]
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe_cls = type(teacher.pipeline)
    pipe = pipe_cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True, **RELOAD.get(family, {}))
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    diff = max_diff_to_student(objective, pipe, spec, cond, shape)
    print(f"{family} DMD2 LoRA: max |stock − fewstep| = {diff:.2e}")
    assert diff < TOLERANCE


def test_phased_dmd_experts_run_in_a_stock_pipeline_with_adapter_switching(tmp_path):
    """Every expert exports as its own LoRA; a stock pipeline that switches adapters by phase in
    ``callback_on_step_end`` (docs/dmd.md) reproduces the student's phased sampler."""
    from fewstep.objectives.dmd.phased_dmd import PhasedDMD, PhasedDMDConfig

    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd15"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = PhasedDMDConfig(num_phases=2, steps_per_phase=2, phase_train_steps=[2, 2], real_guidance_scale=2.0,
                             fake_steps_per_generator_step=1)  # fmt: skip
    objective = PhasedDMD(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    with torch.no_grad():  # distinct experts, as training would leave them
        for name in ("expert0", "expert1"):
            for p in objective.trainable()[name].parameters():
                p.add_(0.3 * torch.randn_like(p))
    out = export_student(student, teacher, objective, tmp_path / "export")  # the experts through export_extra
    paths = [out / "experts" / f"expert{k}" / WEIGHT_NAME for k in range(2)]
    assert all(path.is_file() for path in paths)
    spec = read_schedule(out)
    assert spec.steps[4]["timesteps"] == [999, 749, 499, 249]

    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    for k, path in enumerate(paths):
        pipe.load_lora_weights(str(path.parent), weight_name=WEIGHT_NAME, adapter_name=f"expert{k}")
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_adapters("expert0")
    pipe.set_progress_bar_config(disable=True)

    def switch(pipe, i, t, kwargs):  # after step i: the expert of step i + 1
        pipe.set_adapters(f"expert{min((i + 1) // 2, 1)}")
        return kwargs

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours = objective.sampler()(noise, cond, 4, torch.Generator().manual_seed(4))
    theirs = pipe(prompt_embeds=cond.prompt_embeds, latents=noise.clone(), output_type="latent",
                  generator=torch.Generator().manual_seed(4), callback_on_step_end=switch,
                  **spec.call_kwargs(4)).images  # fmt: skip
    diff = (theirs.float() - ours).abs().max().item()
    print(f"phased DMD experts: max |stock − fewstep| = {diff:.2e}")
    assert ours.abs().max() > 0.1 and diff < TOLERANCE
