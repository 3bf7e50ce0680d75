"""Continuous-time students (rCM, sCM) of the video pipelines that take no ``sigmas=`` (Wan 2.1, Wan 2.2 TI2V-5B,
LTX-Video), trained a few steps from the shipped recipes' objective blocks on the tiny models and exported as a LoRA
with a ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``.

The student samples the levels that scheduler runs inside the stock pipeline (``fewstep.objectives.pipeline_grid``):
Wan's own ``set_timesteps(K)``, solved so that at the recipe's ``pipeline_steps`` it is DMD's ``shift(1 − i/K)``, and
LTX's ``linspace(1, 1/K, K)`` shifted by the video's token count. The stock ``WanPipeline`` and
``WanImageToVideoPipeline`` then reproduce the student draw for draw at 2 and 4 steps, and at one step with the
scheduler loaded with ``shift_terminal=None``; the stock ``LTXPipeline`` reproduces the one-step student and runs the
student's levels at 2 and 4 steps (its re-noise is drawn in the packed token layout, so not draw for draw)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.config import load_recipe
from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.protocol import OBJECTIVES
from tests.helpers import TOLERANCE, single_thread, train_at_phases  # noqa: F401 (fixture)
from tests.unit.export.test_export_ltx import stock_ltx_latents
from tests.unit.export.test_export_wan import stock_wan_latents

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "consistency"
PROMPTS = ["a red circle rolling", "a blue square falling"]


def student_of(recipe: str, family: str):
    """A tiny LoRA student of ``recipe``'s objective, trained 3 steps: rCM's tangent warmup and critic ratio are cut
    to 1 so that the sCM, DMD and critic updates each run once."""
    block = load_recipe(RECIPES / f"{recipe}.yaml").objective
    fast = {"tangent_warmup_steps": 1, "critic_steps_per_student_step": 1} if block.name == "rcm" else {}
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    student = Student.lora(teacher, rank=4, alpha=8)
    cls = OBJECTIVES.get(block.name)
    objective = cls(cls.Config(**{**block.model_dump(), **fast}), teacher, student)
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    train_at_phases(objective, cond, uncond, shape)
    return teacher, objective, cond, uncond, shape


def with_student(cls, teacher, out, **scheduler_kwargs):
    """The stock pipeline ``cls`` with the exported LoRA and scheduler."""
    pipe = cls.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(out), subfolder="scheduler", **scheduler_kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def levels_of(angles: torch.Tensor) -> torch.Tensor:
    """Flow levels ``s = sin u / (sin u + cos u)`` of TrigFlow angles."""
    return angles.sin() / (angles.sin() + angles.cos())


@pytest.mark.parametrize(("recipe", "family"), [("wan21_rcm_lora", "wan21"), ("wan22_ti2v_scm_lora", "wan22_ti2v")])
def test_stock_wan_pipeline_reproduces_the_continuous_time_student(recipe, family, tmp_path):
    teacher, objective, cond, _, shape = student_of(recipe, family)
    out = export_student(student=objective.student, teacher=teacher, objective=objective, out_dir=tmp_path / "export",
                         base_model=teacher.pipeline.name_or_path)  # fmt: skip
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.scheduler_config["stochastic_sampling"]
    assert spec.recommended_steps == 4 and spec.guidance_scale == 1.0 and 1 not in spec.steps
    assert spec.call_kwargs(4) == {"guidance_scale": 1.0, "num_inference_steps": 4}
    shift = teacher.schedule.shift_factor  # the pipeline's 4-step grid is DMD's shift(1 − i/4) on the teacher's shift
    dmd = teacher.schedule.shift(1 - torch.arange(4) / 4)
    assert torch.allclose(torch.tensor(spec.steps[4]["levels"]), dmd, atol=1e-6), (shift, spec.steps[4])

    pipe = with_student(diffusers.WanPipeline, teacher, out)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    for steps in (2, 4):  # the student's levels are the pipeline's, and so is every re-noise draw
        levels = levels_of(objective.sampler().angles(steps, shape))
        assert torch.allclose(levels, torch.tensor(spec.steps[steps]["levels"]), atol=1e-6)
        ours = objective.sampler()(noise, cond, steps, torch.Generator().manual_seed(steps))
        theirs = stock_wan_latents(pipe, cond, noise, spec.guidance_scale, steps=steps, seed=steps)
        print(f"{recipe}, {steps} steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
        assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
        assert (theirs - ours).abs().max() < TOLERANCE

    one = with_student(diffusers.WanPipeline, teacher, out, shift_terminal=None)  # σ = 1: the student's one step
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_wan_latents(one, cond, noise, spec.guidance_scale)
    print(f"{recipe}, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    one.unload_lora_weights()  # the trained LoRA is what makes the stock pipeline the student
    assert (stock_wan_latents(one, cond, noise, spec.guidance_scale) - ours).abs().max() > 100 * TOLERANCE


def test_stock_wan_image_to_video_pipeline_reproduces_the_ti2v_scm_student(tmp_path):
    teacher, objective, _, _, shape = student_of("wan22_ti2v_scm_lora", "wan22_ti2v")
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (64, 64, 3)).astype(np.uint8))
    cond, _ = encode_prompts(teacher, PROMPTS, max_sequence_length=32, images=[image])
    _, _, f, h, w = shape
    call = {"num_inference_steps": 4, "guidance_scale": 1.0, "output_type": "latent",
            "num_frames": 4 * (f - 1) + 1, "height": 16 * h, "width": 16 * w}  # fmt: skip
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 4, torch.Generator().manual_seed(1))
    pipe = with_student(diffusers.WanImageToVideoPipeline, teacher, out)
    torch.manual_seed(1)  # the scheduler re-noises from the global RNG
    theirs = pipe(image=image, prompt_embeds=cond.prompt_embeds, latents=noise.clone(), **call).frames
    print(f"wan22_ti2v_scm_lora, image-to-video, 4 steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    torch.testing.assert_close(ours[:, :, :1], cond.first_frame_latents, atol=1e-5, rtol=0)
    assert (theirs - ours).abs().max() < TOLERANCE


def test_stock_ltx_pipeline_runs_the_rcm_student(tmp_path):
    teacher, objective, cond, _, shape = student_of("ltx_rcm_lora", "ltx")
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_config["use_dynamic_shifting"] and spec.recommended_steps == 4
    assert spec.call_kwargs(1) == {"guidance_scale": 1.0, "num_inference_steps": 1}
    pipe = with_student(diffusers.LTXPipeline, teacher, out)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_ltx_latents(pipe, cond, noise, spec.guidance_scale)
    print(f"ltx_rcm_lora, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert ours.abs().max() > 0.1 and (theirs - ours).abs().max() < TOLERANCE

    seen = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append(pipeline.scheduler.sigmas[:-1].clone())  # the input levels (the last is 0)
        return callback_kwargs

    for steps in (2, 4):  # the levels the stock call runs, read at every step, are the student's
        seen.clear()
        stock_ltx_latents(pipe, cond, noise, spec.guidance_scale, steps=steps, callback_on_step_end=record)
        levels = levels_of(objective.sampler().angles(steps, shape))
        assert len(seen) == steps and all(torch.allclose(s, levels, atol=1e-6) for s in seen), (seen, levels)
        assert not torch.allclose(levels, torch.linspace(1, 1 / steps, steps))  # shifted by the token count


def test_angles_are_refused_for_a_pipeline_that_cannot_take_them():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21"))
    cls = OBJECTIVES.get("scm")
    with pytest.raises(ValueError, match=r"mid_u=\[1\.1\]: WanPipeline takes no sigmas=.*Remove mid_u"):
        cls(cls.Config(mid_u=[1.1]), teacher, Student.lora(teacher, rank=4, alpha=8))


def test_stock_wan21_image_to_video_pipeline_reproduces_the_i2v_scm_student(tmp_path):
    """Wan 2.1 I2V (first-frame latents concatenated to the channels, CLIP image tokens attended to): the sCM student
    of the shipped recipe, its JVP through the image cross-attention, exported and reproduced at 2 and 4 steps."""
    from tests.unit.export.test_export_wan_i2v import stock_i2v_latents

    block = load_recipe(RECIPES / "wan21_i2v_scm_lora.yaml").objective
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21_i2v"))
    cls = OBJECTIVES.get(block.name)
    objective = cls(cls.Config(**block.model_dump()), teacher, Student.lora(teacher, rank=4, alpha=8))
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (32, 32, 3)).astype(np.uint8))
    cond, uncond = encode_prompts(teacher, PROMPTS, max_sequence_length=32, images=[image])
    shape = latent_shape(teacher, 2)
    train_at_phases(objective, cond, uncond, shape)
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.recommended_steps == 4 and spec.scheduler_config["stochastic_sampling"]

    pipe = with_student(diffusers.WanImageToVideoPipeline, teacher, out)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    for steps in (2, 4):
        ours = objective.sampler()(noise, cond, steps, torch.Generator().manual_seed(steps))
        theirs = stock_i2v_latents(pipe, image, cond, noise, steps=steps, seed=steps)
        print(f"wan21_i2v_scm_lora, {steps} steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
        assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
        assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()
    assert (stock_i2v_latents(pipe, image, cond, noise, steps=4, seed=4) - ours).abs().max() > 100 * TOLERANCE
