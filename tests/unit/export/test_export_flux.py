"""A guidance-distilled Flux teacher (``guidance_embeds``): the student is trained with the embedded guidance the
recipe names (3.5, FLUX.1-dev's default), so its export tells the stock ``FluxPipeline`` to embed the same value, and
the stock pipeline with the exported LoRA and scheduler reproduces the one-step student."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import torch

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import TOLERANCE, single_thread  # noqa: F401 (fixture)


def stock_flux_latents(pipe, cond, noise: torch.Tensor, guidance_scale: float, **kwargs) -> torch.Tensor:
    """The stock pipeline's one-step latents from fewstep's (unpacked) ``noise``, unpacked again."""
    b, c, h, w = noise.shape
    height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
    packed = pipe._pack_latents(noise.clone(), b, c, h, w)
    out = pipe(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        latents=packed,
        height=height,
        width=width,
        output_type="latent",
        **{**kwargs, "guidance_scale": guidance_scale},
    ).images
    return pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)  # fmt: skip


def test_flux_export_embeds_the_trained_guidance_and_reproduces_the_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:flux", guidance_scale=3.5))
    student = Student.lora(teacher, rank=4, alpha=8)
    for name, param in student.named_parameters():
        if "lora_B" in name:  # a student away from the teacher
            torch.nn.init.normal_(param, std=0.05)
    objective = DMD2(DMD2Config(num_student_steps=1, real_guidance_scale=1.0), teacher, student)
    cond, _ = encode_prompts(teacher, ["a red circle", "a blue square"])
    assert torch.equal(cond.guidance, torch.full((2,), 3.5))

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.guidance_scale == 3.5 and "embedded guidance 3.5" in spec.guidance_convention
    assert "guidance_scale=3.5" in (out / "README.md").read_text()

    pipe = diffusers.FluxPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(1))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    kwargs = {k: v for k, v in spec.call_kwargs(1).items() if k != "guidance_scale"}
    theirs = stock_flux_latents(pipe, cond, noise, spec.guidance_scale, **kwargs)
    assert ours.abs().max() > 0.1
    assert (theirs - ours).abs().max() < TOLERANCE
    unguided = stock_flux_latents(pipe, cond, noise, 1.0, **kwargs)  # what the export used to advertise
    assert (unguided - ours).abs().max() > 100 * TOLERANCE
