"""Wan 2.1 DMD2 export: the student's LoRA loads in the stock ``WanPipeline`` (``load_lora_weights``) and, with the
exported scheduler, reproduces the student's 4-step sample on video latents ``[b, 16, f, h, w]`` draw for draw.

``WanPipeline`` takes no ``sigmas=``: it runs its scheduler's own ``set_timesteps(K)``. The exported scheduler's shift
and ``shift_terminal`` are solved so that this grid at K = 4 is DMD's ``shift(1 − i/K)``, and the student is trained
and sampled on it (``fewstep.objectives.pipeline_grid``). At one step the stretch is undefined in diffusers; loaded
with ``shift_terminal=None`` the same scheduler runs σ = 1, the student's one step."""

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


def stock_wan_latents(pipe, cond, noise: torch.Tensor, guidance_scale: float, steps: int = 1, seed: int = 0):
    """The stock ``WanPipeline``'s latents from fewstep's ``noise``; its scheduler re-noises from the global RNG,
    seeded with ``seed`` (fewstep's sampler draws the same noise from a generator seeded alike)."""
    torch.manual_seed(seed)
    return pipe(
        prompt_embeds=cond.prompt_embeds, latents=noise.clone(), num_inference_steps=steps,
        guidance_scale=guidance_scale, output_type="latent",
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

    # the pipeline's own 4-step grid with the exported scheduler is DMD's shift(1 − i/4) on shift 3, as trained
    levels = spec.steps[4]["levels"]
    assert spec.call_kwargs(4) == {"guidance_scale": 1.0, "num_inference_steps": 4}
    assert levels == objective.student_taus(shape).tolist() == objective.sampler().timesteps(4, shape).tolist()
    assert torch.allclose(torch.tensor(levels), torch.tensor([1.0, 0.9, 0.75, 0.5]), atol=1e-6)
    assert 1 not in spec.steps  # diffusers' shift_terminal stretch is undefined at one step
    pipe = diffusers.WanPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 4, torch.Generator().manual_seed(3))
    theirs = stock_wan_latents(pipe, cond, noise, spec.guidance_scale, steps=4, seed=3)
    assert pipe.scheduler.sigmas[:4].tolist() == levels  # the levels the call ran
    assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
    print(f"Wan 2.1 DMD2 LoRA, 4 steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    other_draws = stock_wan_latents(pipe, cond, noise, spec.guidance_scale, steps=4, seed=4)
    assert (other_draws - ours).abs().max() > 100 * TOLERANCE  # the re-noise matters: equal draw for draw

    # one step: the same scheduler without the terminal stretch runs σ = 1, the student's one step
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(out), subfolder="scheduler", shift_terminal=None
    )
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_wan_latents(pipe, cond, noise, spec.guidance_scale)
    print(f"Wan 2.1 DMD2 LoRA, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()  # the LoRA is what makes the stock pipeline the student
    assert (stock_wan_latents(pipe, cond, noise, spec.guidance_scale) - ours).abs().max() > 100 * TOLERANCE

    # the card's snippet samples the recommended 4 steps with the exported scheduler, seeding the global RNG
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")  # not run here: WanPipeline's default clip is 81 frames at 480×832
    assert "sigmas" not in code and "takes no sigmas" not in code
    assert "num_inference_steps=4" in code and "torch.manual_seed(0)" in code and ".frames[0]" in code
