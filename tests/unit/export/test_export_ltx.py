"""LTX-Video DMD2 export: the student's LoRA loads in the stock ``LTXPipeline`` (``load_lora_weights``) and, with the
exported scheduler, runs the student's trained 4-step levels and reproduces its one-step sample (the pipeline's packed
latents, unpacked).

``LTXPipeline`` takes no ``sigmas=`` (its ``timesteps=`` raises in diffusers 0.42: it passes its own sigmas too): it
asks its scheduler for ``linspace(1, 1/N, N)`` shifted by the video token count, which is DMD's grid at that
resolution; the student trains on those float32 levels (``fewstep.objectives.pipeline_grid``). Its scheduler draws the
re-noise in the packed token layout ``[b, f·h·w, c]``, so a multi-step sample cannot match fewstep's draw for draw:
the 4-step check is that the call runs exactly the trained levels."""

from __future__ import annotations

import re
from types import SimpleNamespace

import diffusers
import torch
from safetensors import safe_open

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape, ltx_pack_latents, ltx_unpack_latents
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.objectives.protocol import Batch
from tests.helpers import TOLERANCE, single_thread  # noqa: F401 (fixture)


def stock_ltx_latents(pipe, cond, noise: torch.Tensor, guidance_scale: float, steps: int = 1, **kwargs):
    """The stock ``LTXPipeline``'s latents from fewstep's ``noise`` ``[b, c, f, h, w]``, unpacked."""
    _, _, f, h, w = noise.shape
    packed = pipe(
        prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_embeds_mask.bool(),
        latents=ltx_pack_latents(noise), num_frames=8 * (f - 1) + 1, height=32 * h, width=32 * w,
        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent", **kwargs,
    ).frames  # fmt: skip
    return ltx_unpack_latents(packed, f, h, w)


def test_stock_ltx_pipeline_reproduces_the_dmd2_lora_student(tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:ltx"))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = DMD2Config(num_student_steps=4, fake_score="lora", real_guidance_scale=3.0, health_reference_steps=0)
    objective = DMD2(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle rolling", "a blue square falling"], max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    assert shape == (2, 8, 2, 2, 2)
    groups = objective.trainable()
    opts = {k: torch.optim.AdamW(list(m.parameters()), lr=1e-2) for k, m in groups.items()}
    for step in range(4):  # fake, then generator steps: both adapters move away from B = 0
        phase = "fake_score" if step % 2 == 0 else "student"
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, phase)
        opts[phase].zero_grad()
        out.loss.backward()
        opts[phase].step()

    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert spec.guidance_scale == 1.0 and spec.recommended_steps == 4 and spec.objective == "dmd2"
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys) and not any(".fake." in k for k in keys)

    assert spec.call_kwargs(4) == {"guidance_scale": 1.0, "num_inference_steps": 4}
    assert spec.call_kwargs(1) == {"guidance_scale": 1.0, "num_inference_steps": 1}
    pipe = diffusers.LTXPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, 1, torch.Generator().manual_seed(1))
    theirs = stock_ltx_latents(pipe, cond, noise, spec.guidance_scale)
    assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
    print(f"LTX-Video DMD2 LoRA, 1 step: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < TOLERANCE
    pipe.unload_lora_weights()  # the LoRA is what makes the stock pipeline the student
    assert (stock_ltx_latents(pipe, cond, noise, spec.guidance_scale) - ours).abs().max() > 100 * TOLERANCE

    # 4 steps: the levels the stock call runs (read at every step) are the student's trained ones, float32-exact
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    seen = []

    def record(pipeline, i, t, callback_kwargs):
        seen.append((pipeline.scheduler.sigmas.clone(), float(t)))
        return callback_kwargs

    stock_ltx_latents(pipe, cond, noise, spec.guidance_scale, steps=4, callback_on_step_end=record)
    trained = objective.student_taus(shape)
    assert trained.tolist() == objective.sampler().timesteps(4, shape).tolist()
    assert len(seen) == 4 and all(torch.equal(sigmas[:4], trained) and sigmas[4] == 0 for sigmas, _ in seen)
    assert [t for _, t in seen] == (trained * 1000).tolist()  # the timesteps the transformer was fed
    assert trained.tolist() != [1.0, 0.75, 0.5, 0.25]  # shifted by the video's token count, as LTX does
    print(f"LTX-Video DMD2 LoRA, 4 steps: the stock call ran the trained levels {trained.tolist()}")

    # the card's snippet samples the recommended 4 steps with the exported scheduler, seeding the global RNG
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")
    assert "sigmas" not in code and "num_inference_steps=4" in code and "torch.manual_seed(0)" in code
