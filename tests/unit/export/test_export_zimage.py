"""Z-Image export: LoRA students of the tiny ``zimage`` teacher load in the stock ``ZImagePipeline``
(``load_lora_weights``, no warnings) with the exported scheduler and reproduce fewstep's one-step student (latents in,
latents out; captions passed as the pipeline's list). The pipeline's guidance is ``pos + g·(pos − neg)``: a student
sampled without CFG is called with ``guidance_scale = 0``, which the export writes.

* DMD2: the export keeps the teacher's static shift; the pipeline shifts the exported ``sigmas=`` to the trained
  levels.
* sCM (rCM and TBCM share the sampler and its export): the trained levels, un-shifted by Z-Image's static shift, are
  the ``sigmas``, which the exported scheduler shifts back.

Between steps the stock scheduler draws its re-noise from the global RNG, so several steps agree in distribution, not
draw for draw: the levels it runs are checked instead."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.scm import SCM, SCMConfig
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import (  # noqa: F401 (single_thread: a fixture)
    TOLERANCE,
    first_levels,
    move_lora_away,
    one_step_diff,
    single_thread,
    stock_lora_pipeline,
    train_dmd2_adapters,
)

PROMPTS = ["a red circle", "a small blue square on a table"]


def stock_zimage_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, **extra) -> torch.Tensor:
    """The stock pipeline's latents from fewstep's ``noise`` and captions (each unpadded, as its list), at the
    exported ``guidance_scale`` (``extra``: more pipeline arguments, e.g. ``callback_on_step_end``)."""
    captions = [pe[m.bool()] for pe, m in zip(cond.prompt_embeds, cond.prompt_embeds_mask, strict=True)]
    side = noise.shape[-1] * pipe.vae_scale_factor
    return pipe(
        prompt_embeds=captions, latents=noise.clone(), height=side, width=side, output_type="latent",
        **spec.call_kwargs(num_steps), **extra,
    ).images  # fmt: skip


def test_stock_zimage_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:zimage", guidance_scale=4.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=4.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS)
    shape = latent_shape(teacher, 2)
    train_dmd2_adapters(objective, cond, uncond, shape)  # both adapters move away from B = 0

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.recommended_steps == 4
    assert spec.guidance_scale == 0.0, "no CFG in ZImagePipeline's convention"
    assert "guidance_scale=0" in (out / "README.md").read_text()
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    for layer in (".attention.to_q.", ".attention.to_out.0.", ".feed_forward.w1.", ".feed_forward.w3."):
        assert any(layer in k for k in keys), layer
    for block in ("noise_refiner.", "context_refiner.", "layers."):  # the refiners and the main blocks
        assert any(k.startswith(f"transformer.{block}") for k in keys), block
    assert not any(".fake." in k for k in keys), "only the student's adapter is exported"

    pipe = stock_lora_pipeline(diffusers.ZImagePipeline, teacher, out, spec)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours, _ = one_step_diff(
        objective, partial(stock_zimage_latents, pipe, spec, cond, noise, 1), cond, noise, "zimage DMD2 LoRA"
    )
    levels = first_levels(partial(stock_zimage_latents, pipe, spec, cond, noise, 4), 4)
    trained = objective.sampler().timesteps(4, shape)
    assert (levels - trained).abs().max() < 1e-6, (levels, trained)
    pipe.unload_lora_weights()
    base = stock_zimage_latents(pipe, spec, cond, noise, 1)
    assert (base - ours).abs().max() > 100 * TOLERANCE, "the LoRA must matter for the comparison to mean much"


def test_stock_zimage_pipeline_runs_the_trained_levels_of_an_scm_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:zimage", guidance_scale=4.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    move_lora_away(student)  # a student away from the teacher
    objective = SCM(SCMConfig(guidance_scale=4.0, mid_u=[1.1]), teacher, student)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift"] == 6.0
    assert spec.guidance_scale == 0.0
    levels = spec.steps[2]["levels"]
    u = torch.tensor(1.1)
    assert abs(levels[1] - float(u.sin() / (u.sin() + u.cos()))) < 1e-6
    k, sigma = 6.0, spec.steps[2]["sigmas"][1]
    assert abs(k * sigma / (1 + (k - 1) * sigma) - levels[1]) < 1e-6, "the scheduler's shift maps sigmas to levels"

    pipe = stock_lora_pipeline(diffusers.ZImagePipeline, teacher, out, spec)
    cond, _ = encode_prompts(teacher, PROMPTS)
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))
    ours, _ = one_step_diff(
        objective, partial(stock_zimage_latents, pipe, spec, cond, noise, 1), cond, noise, "zimage sCM LoRA"
    )
    assert torch.allclose(
        first_levels(partial(stock_zimage_latents, pipe, spec, cond, noise, 2), 2), torch.tensor(levels), atol=1e-6
    )
