"""Wan 2.1 DMD2 export: the student's LoRA loads in the stock ``WanPipeline`` (``load_lora_weights``) and, with the
exported scheduler, reproduces the student's one-step sample on video latents ``[b, 16, f, h, w]``.

``WanPipeline`` takes no ``sigmas=``, so only its own grid for a step count can be asked of it; at one step that grid
is the DMD student's (σ = 1, then 0)."""

from __future__ import annotations

import re
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
from tests.helpers import TOLERANCE, single_thread, train_dmd2_adapters  # noqa: F401 (fixture)


def stock_wan_latents(pipe, cond, noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The stock ``WanPipeline``'s one-step latents from fewstep's ``noise``."""
    return pipe(
        prompt_embeds=cond.prompt_embeds, latents=noise.clone(), num_inference_steps=1, guidance_scale=guidance_scale,
        output_type="latent",
    ).frames  # fmt: skip


def test_stock_wan_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=5.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle rolling", "a blue square falling"], max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    assert shape == (2, 16, 2, 4, 4)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export", base_model=teacher.pipeline.name_or_path)
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert spec.guidance_scale == 1.0 and spec.recommended_steps == 4 and spec.objective == "dmd2"
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys) and not any(".fake." in k for k in keys)

    assert spec.call_kwargs(1)["sigmas"] == [1.0]
    pipe = diffusers.WanPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_wan_latents(pipe, cond, noise, spec.guidance_scale)
    assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
    print(f"Wan 2.1 DMD2 LoRA, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()  # the LoRA is what makes the stock pipeline the student
    assert (stock_wan_latents(pipe, cond, noise, spec.guidance_scale) - ours).abs().max() > 100 * TOLERANCE

    # the card's snippet: WanPipeline takes no sigmas=, so it samples the one step it reproduces, and returns frames
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")  # not run here: WanPipeline's default clip is 81 frames at 480×832
    assert "sigmas" not in code.split("# WanPipeline takes no sigmas=")[-1].split("\n", 1)[-1]
    assert "num_inference_steps=1" in code and ".frames[0]" in code and "fewstep sample" in code
