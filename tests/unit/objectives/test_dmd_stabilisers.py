"""One-step DMD stabilisers of ``dmd2``: projected DMD, CFG-normalised real score, extra flow timestep shift."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config, sample_levels
from fewstep.objectives.dmd.functional import project_radial
from fewstep.objectives.protocol import Batch
from tests.helpers import single_thread  # noqa: F401 (fixture)


def digits_teacher(variant: str) -> Teacher:
    return load_teacher(SimpleNamespace(pretrained=f"fewstep:digits-{variant}", family="auto", dtype="float32",
                                        guidance_scale=1.0, revision=None, variant=None))  # fmt: skip


@pytest.fixture(scope="module")
def flow_teacher() -> Teacher:
    return digits_teacher("flow")


@pytest.fixture(scope="module")
def vp_teacher() -> Teacher:
    return digits_teacher("vp")


def centred(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return flat - flat.mean(dim=1, keepdim=True)


def digits_batch(teacher: Teacher, b: int = 8) -> Batch:
    cond = Conditioning(class_labels=torch.arange(b) % 10)
    return Batch(cond=cond, uncond=teacher.uncond_like(cond), x0=torch.zeros(b, 1, 8, 8))


# --- projected DMD ------------------------------------------------------------------------------------------------


def test_project_radial_leaves_no_component_along_the_centred_sample():
    torch.manual_seed(0)
    x, g = torch.randn(6, 1, 8, 8) * 3 + 1, torch.randn(6, 1, 8, 8)
    g_proj = project_radial(g, x)
    xc = centred(x)
    dots = (g_proj.flatten(1) * xc).sum(1)
    scale = g.flatten(1).norm(dim=1) * xc.norm(dim=1)
    assert (dots.abs() / scale).max() < 1e-5
    assert (g_proj.flatten(1).norm(dim=1) <= g.flatten(1).norm(dim=1) * (1 + 1e-6)).all()  # an orthogonal projection
    assert not torch.allclose(g_proj, g, atol=1e-3)  # a random g has a radial part to lose


def test_project_radial_keeps_orthogonal_g_and_removes_a_pure_radial_one():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 4, 4)
    xc = centred(x)
    r = torch.randn_like(xc)
    ortho = r - ((r * xc).sum(1, keepdim=True) / (xc * xc).sum(1, keepdim=True)) * xc  # g ⟂ x_c
    assert torch.allclose(project_radial(ortho.reshape(x.shape), x), ortho.reshape(x.shape), atol=1e-6)
    constant = torch.full_like(x, 0.7)  # a uniform shift is orthogonal to any centred sample
    assert torch.allclose(project_radial(constant, x), constant, atol=1e-6)
    radial = (torch.tensor([2.0, -0.5, 1e-3, 40.0])[:, None] * xc).reshape(x.shape)
    assert project_radial(radial, x).abs().max() < 1e-5 * radial.abs().max()
    # a flat sample (x_c = 0) has no radial direction: nothing removed, nothing NaN
    flat_x, g = torch.full((2, 1, 4, 4), 0.3), torch.randn(2, 1, 4, 4)
    assert torch.equal(project_radial(g, flat_x), g)


def test_projected_dmd_step_runs_and_shrinks_dm_grad_norm_on_digits(vp_teacher):
    """Same seed, same fake score, guided real score (w = 2, so g ≠ 0 at step 0): the projected g is shorter."""
    config = DMD2Config(real_guidance_scale=2.0, fake_score="full", health_reference_steps=0)
    torch.manual_seed(0)
    objective = DMD2(config, vp_teacher, Student.full(vp_teacher))
    batch = digits_batch(vp_teacher)
    outs = {}
    for projection in ("none", "radial"):
        objective.config = config.model_copy(update={"dm_projection": projection})
        torch.manual_seed(3)
        outs[projection] = objective.loss(batch, 0, "student")
    out = outs["radial"]
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sum(float(p.grad.abs().sum()) for p in objective.generator.parameters() if p.grad is not None) > 0
    plain, proj = outs["none"].metrics["dm_grad_norm"], out.metrics["dm_grad_norm"]
    removed = out.metrics["dm_radial_norm"]
    print(f"digits-vp w=2 dm_grad_norm: plain {plain:.4f}, radial {proj:.4f}, removed {removed:.4f}")
    assert 0 < proj < plain
    assert "dm_radial_norm" not in outs["none"].metrics  # the default logs exactly what it logged before


# --- CFG-normalised real score ------------------------------------------------------------------------------------


def real_inputs(teacher: Teacher, b: int = 6):
    torch.manual_seed(2)
    cond = Conditioning(class_labels=torch.arange(b) % 10)
    tau = torch.linspace(0.15, 0.9, b)
    x_t = teacher.schedule.alpha(tau)[:, None, None, None] * torch.randn(b, 1, 8, 8).clamp(-1, 1)
    x_t = x_t + teacher.schedule.sigma(tau)[:, None, None, None] * torch.randn(b, 1, 8, 8)
    return x_t, tau, cond, teacher.uncond_like(cond)


@pytest.mark.parametrize("variant", ["flow", "vp"])
def test_real_cfg_normalize_puts_the_guided_x0_at_the_conditional_norm(variant, flow_teacher, vp_teacher):
    teacher = flow_teacher if variant == "flow" else vp_teacher
    objective = DMD2(DMD2Config(real_cfg_normalize=True, health_reference_steps=0), teacher, Student.full(teacher))
    x_t, tau, cond, uncond = real_inputs(teacher)
    real, _ = objective.real_fake_x0(x_t, tau, cond, uncond, 4.0)
    cond_x0 = teacher.predict(x_t, tau, cond, guidance_scale=1.0).x0
    guided = teacher.predict(x_t, tau, cond, uncond, guidance_scale=4.0).x0
    norm_real, norm_cond = real.flatten(1).norm(dim=1), cond_x0.flatten(1).norm(dim=1)
    norm_guided = guided.flatten(1).norm(dim=1)
    print(f"{variant}: guided/cond norm ratio at w=4: {(norm_guided / norm_cond).tolist()}")
    assert torch.allclose(norm_real, norm_cond, rtol=1e-5)
    assert not torch.allclose(norm_guided, norm_cond, rtol=1e-2)  # there was something to normalise
    cosine = torch.nn.functional.cosine_similarity(real.flatten(1), guided.flatten(1), dim=1)
    assert (cosine > 1 - 1e-5).all()  # CFG's direction is kept


def test_real_cfg_normalize_is_a_no_op_at_w1_and_never_rescales_twice(flow_teacher):
    teacher = flow_teacher
    x_t, tau, cond, uncond = real_inputs(teacher)
    plain = DMD2(DMD2Config(health_reference_steps=0), teacher, Student.full(teacher))
    normed = DMD2(DMD2Config(real_cfg_normalize=True, health_reference_steps=0), teacher, Student.full(teacher))
    assert torch.equal(plain.real_fake_x0(x_t, tau, cond, uncond, 1.0)[0],
                       normed.real_fake_x0(x_t, tau, cond, uncond, 1.0)[0])  # fmt: skip
    # a teacher with its own guided-output rescale (Qwen-Image's true CFG) keeps only its own
    teacher.cfg_rescale = lambda guided, cond_out: 0.5 * guided
    try:
        assert torch.equal(plain.real_fake_x0(x_t, tau, cond, uncond, 3.0)[0],
                           normed.real_fake_x0(x_t, tau, cond, uncond, 3.0)[0])  # fmt: skip
    finally:
        teacher.cfg_rescale = None


# --- timestep shift -----------------------------------------------------------------------------------------------


def test_dm_timestep_shift_moves_the_median_level_to_the_analytic_value(flow_teacher):
    ntok = None
    torch.manual_seed(0)
    base = sample_levels(flow_teacher, 4096, 0.02, 0.98, ntok, "cpu")
    torch.manual_seed(0)
    shifted = sample_levels(flow_teacher, 4096, 0.02, 0.98, ntok, "cpu", 3.0)
    torch.manual_seed(0)
    unit = sample_levels(flow_teacher, 4096, 0.02, 0.98, ntok, "cpu", 1.0)
    print(f"median DM level: teacher {float(base.median()):.4f}, k=3 {float(shifted.median()):.4f}")
    assert abs(float(base.median()) - 0.5) < 0.02
    assert abs(float(shifted.median()) - 3 * 0.5 / (1 + 2 * 0.5)) < 0.02
    assert torch.allclose(unit, base, atol=1e-7)


def fed_timesteps(module: torch.nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Record the ``timestep`` argument of every ``UNet2DModel`` forward (positional, as the adapter calls it)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[1].detach().float().clone()))
    return seen, handle


def test_dm_and_fake_timestep_shifts_reach_the_networks(flow_teacher):
    """The real score is fed the shifted DM levels; the fake score's denoising levels move by their own key."""
    config = DMD2Config(real_guidance_scale=1.0, fake_score="full", health_reference_steps=0, dm_timestep_shift=3.0,
                        fake_timestep_shift=4.0)  # fmt: skip
    objective = DMD2(config, flow_teacher, Student.full(flow_teacher))
    scale = flow_teacher.schedule.timestep_scale
    seen, handle = fed_timesteps(flow_teacher.denoiser.backbone)
    try:
        b = 512
        x = torch.zeros(b, 1, 8, 8)
        torch.manual_seed(5)
        objective.dm_direction(x, Conditioning(class_labels=torch.arange(b) % 10), None)
        torch.manual_seed(5)
        expected = sample_levels(flow_teacher, b, config.min_step_percent, config.max_step_percent, None, "cpu", 3.0)
        assert torch.allclose(seen[0] / scale, expected, atol=1e-5)
    finally:
        handle.remove()
    seen, handle = fed_timesteps(objective.fake.core.denoiser.backbone)
    try:
        torch.manual_seed(6)
        objective.loss(digits_batch(flow_teacher, 512), 1, "fake_score")
        median = float((seen[-1] / scale).median())
        assert abs(median - 4 * 0.5 / (1 + 3 * 0.5)) < 0.05, median  # full range U[0, 1] shifted by k = 4: 0.8
    finally:
        handle.remove()


def test_timestep_shift_is_refused_for_a_vp_teacher(vp_teacher):
    for key in ("dm_timestep_shift", "fake_timestep_shift"):
        with pytest.raises(ValueError, match=f"objective.{key} .* needs a flow teacher.*remove {key}"):
            DMD2(DMD2Config(**{key: 3.0}), vp_teacher, Student.full(vp_teacher))
