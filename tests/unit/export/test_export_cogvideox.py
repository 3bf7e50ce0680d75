"""CogVideoX export: DMD2-LoRA and LCM-LoRA students (the shipped recipes' objective blocks) trained a few steps on
the tiny model, exported, load in the stock ``CogVideoXPipeline`` with ``load_lora_weights`` (no warnings) and the
exported ``LCMScheduler``, and reproduce fewstep's student samples at 1, 2 and 4 steps.

``CogVideoXPipeline`` takes ``num_inference_steps`` (and ``timesteps=``, which its own CogVideoX schedulers refuse:
their ``set_timesteps`` has no such argument) and passes any scheduler but ``CogVideoXDPMScheduler`` the plain
``step(noise_pred, t, latents, generator=...)``, so ``LCMScheduler`` runs there as in the image pipelines: its own
``set_timesteps(K)`` is the student's grid. Two things the export carries over: the teacher's SNR-shifted ``ᾱ``, which
``LCMScheduler`` cannot compute from CogVideoX's beta config, goes in as ``trained_betas``; and the scheduler draws its
re-noise from the pipeline's generator in the pipeline's ``[b, f, c, h, w]`` layout, which fewstep's sampler draws
in too for this family (``renoise_layout``), so multi-step samples match draw for draw."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors import safe_open

from fewstep.config import load_recipe
from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import COGVIDEOX_LAYOUT, latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.lcm import LCM, LCMConfig
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.solvers.samplers import fresh_noise
from tests.helpers import TOLERANCE, single_thread, train_at_phases  # noqa: F401 (fixture)

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
PROMPTS = ["a red circle", "a blue square"]


def trained(objective_cls, config_cls, recipe: str):
    """A tiny LoRA student with ``recipe``'s objective block (the health check's 50 teacher steps left out), trained
    on the phases of its objective."""
    block = load_recipe(RECIPES / recipe).objective.model_dump()
    block.pop("health_reference_steps", None)
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:cogvideox"))
    extra = {"health_reference_steps": 0} if objective_cls is DMD2 else {}
    objective = objective_cls(config_cls(**block, **extra), teacher, Student.lora(teacher, rank=4, alpha=8))
    cond, uncond = encode_prompts(teacher, PROMPTS)
    shape = latent_shape(teacher, 2)
    train_at_phases(objective, cond, uncond, shape, steps=4)
    return teacher, objective, cond, shape


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def stock_pipe(teacher, out):
    """The stock ``CogVideoXPipeline`` with the exported LoRA (no warning while it loads) and scheduler."""
    pipe = diffusers.CogVideoXPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    handler, root = _Warnings(), logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    finally:
        root.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]  # no unexpected or missing keys
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_latents(pipe, spec, cond, noise: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    """The stock pipeline's latents from fewstep's ``noise`` ``[b, c, f, h, w]``, back in fewstep's layout."""
    _, _, f, h, w = noise.shape
    out = pipe(
        prompt_embeds=cond.prompt_embeds, latents=noise.permute(COGVIDEOX_LAYOUT), num_frames=4 * (f - 1) + 1,
        height=8 * h, width=8 * w, output_type="latent", generator=torch.Generator().manual_seed(seed),
        **spec.call_kwargs(num_steps),
    ).frames  # fmt: skip
    return out.permute(COGVIDEOX_LAYOUT)


def check_against_stock(objective, teacher, cond, shape, out, label: str) -> None:
    spec = read_schedule(out)
    assert spec.scheduler_class == "LCMScheduler" and spec.recommended_steps == 4 and spec.guidance_scale == 1.0
    assert spec.scheduler_config["prediction_type"] == "v_prediction"
    pipe = stock_pipe(teacher, out)
    theirs_acp = pipe.scheduler.alphas_cumprod.double()  # float32 cumprod of the exported betas
    assert (theirs_acp - teacher.schedule.alphas_cumprod).abs().max() < 1e-6 and float(theirs_acp[-1]) == 0.0
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    for num_steps in (1, 2, 4):
        pipe.scheduler.set_timesteps(num_steps)
        levels = objective.sampler().timesteps(num_steps, shape)
        assert pipe.scheduler.timesteps.tolist() == teacher.schedule.model_timestep(levels).long().tolist()
        ours = objective.sampler()(noise, cond, num_steps, torch.Generator().manual_seed(num_steps))
        theirs = stock_latents(pipe, spec, cond, noise, num_steps, seed=num_steps)
        print(f"{label}, {num_steps} steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}, "
              f"max |x| = {ours.abs().max():.2f}")  # fmt: skip
        assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
        assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()  # without the trained LoRA the stock pipeline is the teacher, not the student
    assert (stock_latents(pipe, spec, cond, noise, 4, seed=4) - ours).abs().max() > 100 * TOLERANCE


def test_stock_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    teacher, objective, cond, shape = trained(DMD2, DMD2Config, "dmd/cogvideox_dmd2_lora.yaml")
    assert objective.config.real_guidance_scale == 6.0 and shape == (2, 4, 3, 4, 4)
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys) and not any(".fake." in k for k in keys)
    assert read_schedule(out).steps[4]["timesteps"] == [999, 749, 499, 249]  # DMD2's 4-step grid
    check_against_stock(objective, teacher, cond, shape, out, "cogvideox_dmd2_lora")


def test_stock_pipeline_reproduces_the_lcm_lora_student(tmp_path):
    teacher, objective, cond, shape = trained(LCM, LCMConfig, "lcm/cogvideox_lcm_lora.yaml")
    assert objective.config.num_ddim_timesteps == 50
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    assert read_schedule(out).scheduler_config["original_inference_steps"] == 50
    check_against_stock(objective, teacher, cond, shape, out, "cogvideox_lcm_lora")


def test_the_renoise_is_drawn_in_the_pipelines_layout():
    shape = (2, 4, 3, 4, 4)
    ours = fresh_noise(shape, torch.Generator().manual_seed(0), COGVIDEOX_LAYOUT)
    theirs = torch.randn((2, 3, 4, 4, 4), generator=torch.Generator().manual_seed(0))  # [b, f, c, h, w]
    assert torch.equal(ours, theirs.permute(COGVIDEOX_LAYOUT))
    plain = fresh_noise(shape, torch.Generator().manual_seed(0))
    assert plain.shape == shape and not torch.equal(plain, ours)


def test_the_cogvideox_schedulers_take_no_timesteps(tmp_path):
    """Why the export ships an ``LCMScheduler``: the pipeline's own schedulers cannot be given a student's grid."""
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:cogvideox"))
    with pytest.raises(ValueError, match="does not support custom timestep"):
        teacher.pipeline(prompt=PROMPTS[:1], timesteps=[999, 499], num_frames=9, height=32, width=32,
                         max_sequence_length=16, output_type="latent")  # fmt: skip
