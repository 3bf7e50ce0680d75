"""PCM / Hyper-SD TSCD: segments, the TCD sampler against diffusers, the 8→4→2→1 curriculum on a
2-D toy, adversarial and reward terms, and one exported LoRA that a stock pipeline samples at 1/2/4/8 steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers import TCDScheduler

from fewstep.export import WEIGHT_NAME, export_student, read_schedule
from fewstep.models.backbones import latent_shape
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.pcm import PCM, PCMConfig, curriculum_segments, jump_gain
from fewstep.objectives.protocol import OBJECTIVES, Batch
from fewstep.solvers.grids import segment_edges, trailing_vp_grid
from tests.helpers import (
    make_teacher,
    mixture,
    single_thread,  # noqa: F401 (fixture)
    sliced_wasserstein,
    train_teacher,
)

TOLERANCE = 1e-4
CURRICULUM = [dict(segments=m, steps=2) for m in (8, 4, 2, 1)]


def test_registered_and_curriculum():
    assert OBJECTIVES.get("pcm") is PCM
    cfg = PCMConfig(curriculum=[dict(segments=m, steps=10) for m in (8, 4, 2, 1)])
    assert [curriculum_segments(cfg, s) for s in (0, 9, 10, 25, 35, 1000)] == [8, 8, 4, 2, 1, 1]
    assert curriculum_segments(PCMConfig(segments=4), 123) == 4


@pytest.mark.parametrize("segments", [1, 2, 4, 8])
def test_segments_are_tcd_scheduler_picks_and_nest(segments):
    scheduler = TCDScheduler()
    scheduler.set_timesteps(segments)
    starts = segment_edges(50, segments, starts=True)
    assert (starts * 20 - 1).tolist() == scheduler.timesteps.tolist()  # grid index k is timestep 20k − 1
    edges = segment_edges(50, segments, starts=False)
    assert edges[0] == 0 and sorted(edges.tolist()) == edges.tolist() and len(edges) == segments
    assert set(segment_edges(50, max(1, segments // 2), starts=False).tolist()) <= set(edges.tolist())
    teacher = make_teacher("vp")
    objective = PCM(PCMConfig(w_min=0, w_max=0, segments=segments), teacher, Student.full(teacher))
    idx = torch.arange(50)
    e = objective.edge_index(idx, segments)
    assert torch.all(e <= idx) and torch.all(idx - e < math.ceil(50 / segments))
    assert set(e.tolist()) == set(edges.tolist())


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_sampler_equals_tcd_scheduler_loop(gamma):
    torch.manual_seed(0)
    teacher = make_teacher("vp")
    student = Student.full(teacher)
    objective = PCM(PCMConfig(w_min=0, w_max=0, gamma=gamma), teacher, student)
    net = student.denoiser.backbone
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    for n in (1, 2, 4, 8):
        ours = objective.sampler()(noise, Conditioning(), n, torch.Generator().manual_seed(2))
        scheduler = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        scheduler.set_timesteps(n)
        x, generator = noise.clone(), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, t.expand(64)), t, x, eta=gamma, generator=generator).prev_sample
        assert (ours - x).abs().max().item() < 1e-4, (n, gamma)  # measured ≤ 2e-5 (fp64 vs fp32 ᾱ)


@pytest.mark.slow
def test_toy_curriculum_multistep_is_closer_to_the_teacher_than_one_step():
    teacher = train_teacher("vp")
    torch.manual_seed(1)
    cfg = PCMConfig(w_min=0, w_max=0, curriculum=[dict(segments=m, steps=150) for m in (8, 4, 2, 1)])
    objective = PCM(cfg, teacher, Student.full(teacher))
    opt = torch.optim.AdamW([p for p in objective.student.parameters() if p.requires_grad], lr=1e-3)
    for step in range(600):
        out = objective.loss(Batch(cond=Conditioning(), x0=mixture(256)), step, objective.phase(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    reference = teacher.sample(noise, Conditioning(), trailing_vp_grid(50))
    sampler = objective.sampler()
    sw = {n: sliced_wasserstein(sampler(noise, Conditioning(), n, torch.Generator().manual_seed(3)), reference)
          for n in (1, 2, 4)}  # fmt: skip
    print("TSCD toy, SW to the teacher's 50 steps:", sw)  # measured: 1: 0.86, 2: 0.36, 4: 0.63
    assert sw[2] < sw[1] and sw[4] < sw[1]


def tiny_pcm(family: str, reward=None, **config):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    student = Student.lora(teacher, rank=4, alpha=8)
    objective = PCM(PCMConfig(w_min=1.0, w_max=2.0, **config), teacher, student, reward=reward)
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    return teacher, student, objective, cond, uncond


def train_steps(objective, cond, uncond, shape, steps: int, lr: float = 1e-2) -> list[dict]:
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
            for k, m in objective.trainable().items()}  # fmt: skip
    metrics = []
    for step in range(steps):
        phase = objective.phase(step)
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, phase)
        opts[phase].zero_grad()
        out.loss.backward()
        opts[phase].step()
        metrics.append(out.metrics)
    return metrics


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_exported_lora_serves_1_2_4_8_steps_in_a_stock_pipeline(family, tmp_path):
    teacher, student, objective, cond, uncond = tiny_pcm(family, curriculum=CURRICULUM)
    shape = latent_shape(teacher, 2)
    metrics = train_steps(objective, cond, uncond, shape, steps=8)
    assert [m["segments"] for m in metrics] == [8, 8, 4, 4, 2, 2, 1, 1]
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "TCDScheduler" and spec.call_kwargs(4)["eta"] == objective.config.gamma
    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt_embeds": cond.prompt_embeds}
    if cond.pooled_prompt_embeds is not None:
        kwargs["pooled_prompt_embeds"] = cond.pooled_prompt_embeds
    diffs = {}
    for n in (1, 2, 4, 8):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + n))
        ours = objective.sampler()(noise, cond, n, torch.Generator().manual_seed(n))
        theirs = pipe(**kwargs, latents=noise.clone(), output_type="latent",
                      generator=torch.Generator().manual_seed(n), **spec.call_kwargs(n)).images  # fmt: skip
        assert ours.abs().max() > 0.1
        diffs[n] = (theirs.float() - ours).abs().max().item()
    print(f"{family} TSCD LoRA: max |stock − fewstep| per steps = {diffs}")
    assert max(diffs.values()) < TOLERANCE


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_flow_pcm_lora_exports_to_a_stock_sd3_pipeline(gamma, tmp_path):
    """Flow teachers: FlowMatchEulerDiscreteScheduler at the segment edges, deterministic (γ = 0) or with
    stochastic_sampling (γ = 1), reproduces fewstep's PCM sampler in a stock StableDiffusion3Pipeline."""
    teacher, student, objective, cond, uncond = tiny_pcm("sd3", curriculum=CURRICULUM, gamma=gamma)
    shape = latent_shape(teacher, 2)
    train_steps(objective, cond, uncond, shape, steps=4)
    out = export_student(student, teacher, objective, tmp_path / "export")
    spec = read_schedule(out)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert spec.scheduler_config["stochastic_sampling"] is (gamma == 1.0)
    pipe = type(teacher.pipeline).from_pretrained(str(teacher.pipeline.name_or_path), local_files_only=True,
                                                  text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_prompt_embeds}
    diffs = {}
    for n in (1, 2, 4):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10 + n))
        ours = objective.sampler()(noise, cond, n, torch.Generator().manual_seed(n))
        torch.manual_seed(n)  # SD3's pipeline draws the re-noise from the global RNG
        theirs = pipe(**kwargs, latents=noise.clone(), output_type="latent",
                      **spec.call_kwargs(n)).images  # fmt: skip
        assert ours.abs().max() > 0.1
        diffs[n] = (theirs.float() - ours).abs().max().item()
    print(f"sd3 PCM LoRA γ={gamma}: max |stock − fewstep| per steps = {diffs}")
    assert max(diffs.values()) < TOLERANCE


def test_adversarial_term_alternates_and_trains_the_discriminator():
    teacher, student, objective, cond, uncond = tiny_pcm("sd15", adv_weight=0.1)
    assert set(objective.trainable()) == {"student", "discriminator"}
    assert [objective.phase(s) for s in range(4)] == ["student", "discriminator"] * 2
    before = [p.clone() for p in objective.discriminator.parameters()]
    metrics = train_steps(objective, cond, uncond, latent_shape(teacher, 2), steps=2)
    assert "adv_g" in metrics[0] and all(math.isfinite(m["loss"]) for m in metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.discriminator.parameters()))


def test_jump_weighting_scales_long_jumps_down_to_epsilon_units():
    """The gain of a jump is ``σ/α`` from the noisiest level to the clean edge (≈ 15 at t = 999 on SD's betas), ≈ 0
    onto the edge itself, and with ``jump_weighting`` a sample's loss is the unweighted one divided by max(1, gain)."""
    teacher = make_teacher("vp")
    objective = PCM(PCMConfig(w_min=0, w_max=0, segments=1), teacher, Student.full(teacher))
    grid, schedule = objective.grid, objective.schedule
    top = jump_gain(schedule, grid[-1:], grid[:1])
    assert 13 < top.item() < 16 and top.item() == pytest.approx(
        (schedule.sigma(grid[-1]) / schedule.alpha(grid[-1])).item(), rel=0.01
    )
    assert jump_gain(schedule, grid[1:2], grid[1:2]).item() < 1e-6
    gains = jump_gain(schedule, grid[1:], torch.zeros(50).to(grid) + grid[0])
    assert torch.all(gains[1:] > gains[:-1])  # longer jumps magnify more

    x0 = torch.randn(1, 2)
    ratios, expected = [], []
    for seed in range(8):  # batch of one: the loss is that sample's distance, weighted or not
        losses = {}
        for weighted in (False, True):
            objective.config.jump_weighting = weighted
            torch.manual_seed(seed)
            losses[weighted] = objective.loss(Batch(x0=x0, cond=Conditioning()), 0, "student").loss.item()
        torch.manual_seed(seed)
        idx = torch.randint(0, 50, (1,))  # the interval the loss draws first
        expected.append(1 / jump_gain(schedule, grid[idx + 1], grid[:1]).clamp(min=1.0).item())
        ratios.append(losses[True] / losses[False])
    assert ratios == pytest.approx(expected, rel=1e-4)
    assert min(expected) < 0.5 and max(expected) == 1.0  # both regimes were drawn


def test_reward_feedback_raises_a_small_differentiable_reward():
    """Reward = −mean(x̂0²) per sample (prefers small latents): with only the reward term, it goes up."""
    reward = lambda x0, c: -(x0**2).flatten(1).mean(1)  # noqa: E731
    teacher, student, objective, cond, uncond = tiny_pcm("sd15", reward=reward, reward_weight=1.0)
    objective.config.huber_c = 1e3  # consistency term ≈ 0: the reward drives the update
    shape = latent_shape(teacher, 2)
    torch.manual_seed(5)
    metrics = train_steps(objective, cond, uncond, shape, steps=6, lr=3e-3)
    print("rewards", [round(m["reward"], 4) for m in metrics])
    assert metrics[-1]["reward"] > metrics[0]["reward"]
    with pytest.raises(ValueError, match="reward"):
        PCM(PCMConfig(reward_weight=1.0), teacher, student)


def test_cfg_free_teacher_and_config_errors():
    teacher, student, objective, cond, uncond = tiny_pcm("sd15", cfg_free_teacher=True, cond_dropout=0.5)
    metrics = train_steps(objective, cond, uncond, latent_shape(teacher, 2), steps=1)
    assert math.isfinite(metrics[0]["loss"])
    assert objective.sampling_spec().guidance_scale == 2.0  # CFG usable: 1 + w_min
    with pytest.raises(ValueError, match="w_max"):
        PCMConfig(w_min=5, w_max=1)
    with pytest.raises(ValueError, match="segments=64"):
        PCMConfig(segments=64)
    with pytest.raises(ValueError, match="x0"):
        objective.loss(Batch(cond=cond), 0, "student")


def test_one_step_enhancement_reuses_the_dmd_roles_and_exports_the_student_adapter(tmp_path):
    from fewstep.objectives.dmd.roles import adapter_parameters

    teacher, student, objective, cond, uncond = tiny_pcm("sd15", dmd_weight=1.0, dmd_start_step=1)
    assert set(objective.trainable()) == {"student", "fake_score"}
    assert [objective.phase(s) for s in range(5)] == ["student", "fake_score", "student", "fake_score", "student"]
    backbone = student.denoiser.backbone
    fake_before = {k: v.clone() for k, v in adapter_parameters(backbone, "fake").items()}
    metrics = train_steps(objective, cond, uncond, latent_shape(teacher, 2), steps=3)
    assert "dmd" not in metrics[0] and "fake" in metrics[1] and "dmd" in metrics[2]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert any(not torch.equal(v, fake_before[k]) for k, v in adapter_parameters(backbone, "fake").items())
    out = export_student(student, teacher, objective, tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        assert f.keys() and not any(".fake." in k for k in f.keys())  # the student's adapter only
