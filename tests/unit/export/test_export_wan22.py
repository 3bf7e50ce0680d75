"""Phased DMD on Wan 2.2: the pipeline's two experts are the two phases, and the export is two LoRAs the stock
``WanPipeline`` loads (``transformer``'s, and ``transformer_2``'s with ``load_into_transformer_2=True``). With the
exported scheduler the stock pipeline reproduces the student's 4-step sample (2 steps per expert) on video latents.

``WanPipeline`` takes no ``sigmas=`` and does not pass ``generator`` to ``scheduler.step``: the grid is the exported
scheduler's own ``set_timesteps(4)`` and the re-noise comes from the global RNG (``torch.manual_seed``)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from fewstep.export import TRANSFORMER_2_WEIGHT_NAME, WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.objectives.protocol import Batch
from tests.helpers import TOLERANCE, diffusers_warnings, single_thread  # noqa: F401 (fixture)

SEED = 3


def stock_latents(pipe, spec, cond, noise: torch.Tensor) -> torch.Tensor:
    """The stock pipeline's latents at the trained step count; its re-noise draws from the global RNG."""
    torch.manual_seed(SEED)
    kwargs = spec.call_kwargs(spec.recommended_steps)
    return pipe(prompt_embeds=cond.prompt_embeds, latents=noise.clone(), output_type="latent", **kwargs).frames


def stock_pipe(teacher, out, *, high: bool = True, low: bool = True):
    pipe = diffusers.WanPipeline.from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    with diffusers_warnings() as warned:
        if high:
            pipe.load_lora_weights(str(out))  # the folder's default file: transformer's LoRA
        if low:
            pipe.load_lora_weights(str(out), weight_name=TRANSFORMER_2_WEIGHT_NAME, load_into_transformer_2=True)
    assert not warned, [r.getMessage() for r in warned]  # no unexpected or missing keys, no file-choice guess
    return pipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22", guidance_scale=4.0))
    student = Student.lora(teacher, rank=4, alpha=8)
    config = PhasedDMDConfig(steps_per_phase=2, phase_train_steps=[2, 2], fake_steps_per_generator_step=1,
                             real_guidance_scale=4.0)  # fmt: skip
    objective = PhasedDMD(config, teacher, student)
    cond, uncond = encode_prompts(teacher, ["a red circle rolling", "a blue square falling"], max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    groups = objective.trainable()
    opts = {k: torch.optim.AdamW(list(g.parameters()), lr=1e-2) for k, g in groups.items()}
    for step in range(4):  # expert0, fake0, expert1, fake1
        phase = objective.phase(step)
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, phase)
        opts[phase].zero_grad(set_to_none=True)
        out.loss.backward()
        opts[phase].step()
    out = export_student(student, teacher, objective, tmp_path_factory.mktemp("wan22") / "export")
    return SimpleNamespace(teacher=teacher, objective=objective, cond=cond, shape=shape, out=out)


def test_phases_are_the_experts_and_their_levels(trained):
    objective, teacher = trained.objective, trained.teacher
    groups = objective.trainable()
    assert set(groups) == {"expert0", "expert1", "fake0", "fake1"}
    names = {k: [n for n, _ in g.named_parameters()] for k, g in groups.items()}
    assert all(n.startswith("lora.high__") for k in ("expert0", "fake0") for n in names[k])
    assert all(n.startswith("lora.low__") for k in ("expert1", "fake1") for n in names[k])
    for k, g in groups.items():  # every group moved away from B = 0: each phase trained its own expert
        assert any(p.abs().sum() > 0 for n, p in g.named_parameters() if "lora_B" in n), k
    levels = objective.levels(trained.shape)
    high = teacher.schedule.model_timestep(levels[:4]) >= teacher.denoiser.backbone.boundary_timestep
    assert high.tolist() == [True, True, False, False] and levels[0] == 1.0 and levels[-1] == 0.0
    s = levels[2:3]
    assert objective.diffusion_range(0, s)[0] > s and objective.diffusion_range(1, torch.zeros(1))[1] < levels[1]


def test_stock_wan22_pipeline_reproduces_the_two_expert_student(trained):
    out, teacher, objective = trained.out, trained.teacher, trained.objective
    spec = read_schedule(out)
    assert spec.objective == "phased_dmd" and spec.recommended_steps == 4 and spec.guidance_scale == 1.0
    assert spec.call_kwargs(4) == {"guidance_scale": 1.0, "num_inference_steps": 4}  # WanPipeline takes no sigmas=
    assert spec.steps[4]["levels"] == pytest.approx(objective.levels(trained.shape)[:4].tolist())

    high, low = load_file(str(out / WEIGHT_NAME)), load_file(str(out / TRANSFORMER_2_WEIGHT_NAME))
    for state in (high, low):
        assert state and all(k.startswith("transformer.blocks.") and "fake" not in k for k in state)
    assert high.keys() == low.keys() and any(not torch.equal(high[k], low[k]) for k in high)
    for k, state in enumerate((high, low)):  # every expert also in its own folder, as for any Phased DMD export
        own = load_file(str(out / "experts" / f"expert{k}" / WEIGHT_NAME))
        assert own.keys() == state.keys() and all(torch.equal(own[n], state[n]) for n in own)

    noise = torch.randn(trained.shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, trained.cond, 4, torch.Generator().manual_seed(SEED))
    theirs = stock_latents(stock_pipe(teacher, out), spec, trained.cond, noise)
    diff = (theirs - ours).abs().max()
    print(f"Wan 2.2 Phased DMD, two LoRAs, 4 steps: max |stock − fewstep| = {diff:.2e}")
    assert ours.shape == theirs.shape == trained.shape and ours.abs().max() > 0.1
    assert diff < TOLERANCE
    # each LoRA is applied: without either one (or both) the stock pipeline is another model
    for kept in ({"high": True, "low": False}, {"high": False, "low": True}, {"high": False, "low": False}):
        other = stock_latents(stock_pipe(teacher, out, **kept), spec, trained.cond, noise)
        assert (other - ours).abs().max() > 100 * TOLERANCE, kept

    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")  # not run: WanPipeline's default clip is 81 frames at 480×832
    assert f'weight_name="{WEIGHT_NAME}")' in code and "load_into_transformer_2=True" in code
    assert "num_inference_steps=4" in code and "torch.manual_seed(0)" in code and ".frames[0]" in code


def test_merged_wan22_pipeline_fuses_each_experts_lora_into_its_own_component(tmp_path):
    from fewstep.export import save_merged
    from fewstep.models.conditioning import Conditioning
    from fewstep.models.student import adapters_disabled

    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22"))
    student = Student.lora(teacher, rank=4, alpha=8)
    with torch.no_grad():  # both experts' LoRAs non-zero, and different
        for name, p in student.denoiser.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    pipe = diffusers.WanPipeline.from_pretrained(
        str(save_merged(student, teacher, tmp_path / "m")), local_files_only=True
    )
    x, emb = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 8, 32)
    for tau, component in ((0.95, pipe.transformer), (0.5, pipe.transformer_2)):
        ours = student.denoiser.raw(x, torch.full((1,), tau), Conditioning(prompt_embeds=emb))
        with adapters_disabled(student.denoiser.backbone):  # the teacher
            base = student.denoiser.raw(x, torch.full((1,), tau), Conditioning(prompt_embeds=emb))
        timestep = torch.full((1,), 1000 * tau)
        theirs = component(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
        assert (theirs - ours).abs().max() < TOLERANCE and (ours - base).abs().max() > 100 * TOLERANCE, tau


@pytest.mark.parametrize(("recipe", "steps"), [("dmd/wan22_dmd2_lora", 4), ("consistency/wan22_scm_lora", 4)])
def test_one_lora_on_both_experts_exports_as_two_and_reproduces(recipe, steps, tmp_path):
    """DMD2 and sCM students with the shipped recipes' objective blocks: one LoRA student spanning both experts,
    every level run by the expert the pipeline picks there. The export is the same two files as Phased DMD's and the
    stock pipeline reproduces the student; without the low-noise expert's LoRA it does not."""
    from fewstep.config import load_recipe
    from fewstep.objectives.protocol import OBJECTIVES
    from tests.helpers import train_at_phases

    block = load_recipe(recipe).objective
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22", guidance_scale=4.0))
    cls = OBJECTIVES.get(block.name)
    fast = {"health_reference_steps": 0, "fake_steps_per_generator_step": 1} if block.name == "dmd2" else {}
    objective = cls(cls.Config(**{**block.model_dump(), **fast}), teacher, Student.lora(teacher, rank=4, alpha=8))
    cond, uncond = encode_prompts(teacher, ["a red circle rolling", "a blue square falling"], max_sequence_length=32)
    shape = latent_shape(teacher, 2)
    train_at_phases(objective, cond, uncond, shape, steps=16)  # DMD2: 8 generator updates at random student levels
    out = export_student(objective.student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.recommended_steps == steps and spec.call_kwargs(steps)["num_inference_steps"] == steps
    high, low = load_file(str(out / WEIGHT_NAME)), load_file(str(out / TRANSFORMER_2_WEIGHT_NAME))
    assert high.keys() == low.keys() and all(k.startswith("transformer.blocks.") for k in high)
    for state in (high, low):  # both experts' adapters trained
        assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)

    levels = torch.tensor(spec.steps[steps]["levels"])
    high_levels = teacher.schedule.model_timestep(levels) >= teacher.denoiser.backbone.boundary_timestep
    assert high_levels.any() and not high_levels.all()  # the 4-step grid crosses the expert switch
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    ours = objective.sampler()(noise, cond, steps, torch.Generator().manual_seed(SEED))
    theirs = stock_latents(stock_pipe(teacher, out), spec, cond, noise)
    print(f"{recipe}, both experts, {steps} steps: max |stock − fewstep| = {(theirs - ours).abs().max():.2e}")
    assert ours.shape == theirs.shape == shape and ours.abs().max() > 0.1
    assert (theirs - ours).abs().max() < TOLERANCE
    other = stock_latents(stock_pipe(teacher, out, low=False), spec, cond, noise)
    assert (other - ours).abs().max() > 100 * TOLERANCE
