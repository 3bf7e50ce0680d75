"""Phased DMD: the subinterval score-matching target on the paper's 1-D toy, and LoRA experts per
phase on one shared base."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import FlowSchedule
from fewstep.objectives.dmd.functional import subinterval_flow_target, subinterval_x0_target
from fewstep.objectives.dmd.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.objectives.protocol import OBJECTIVES, Batch
from fewstep.solvers.steps import transition_coeffs
from tests.helpers import ToyNet, mixture, single_thread  # noqa: F401 (fixture)


def posterior_mean(x_t: torch.Tensor, t: float, mean: float, var: float) -> torch.Tensor:
    """``E[x0 | x_t]`` for ``x0 ~ N(mean, var)`` and ``x_t = (1 − t)·x0 + t·ε`` (rectified flow)."""
    a = 1 - t
    return mean + a * var / (a**2 * var + t**2) * (x_t - a * mean)


def fit_line(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares ``y ≈ c0 + c1·x`` (the posterior mean is linear for Gaussian data): ``[c0, c1]``."""
    design = torch.stack([torch.ones_like(x), x], 1).double()
    return torch.linalg.lstsq(design, y.double()[:, None]).solution[:, 0]


def test_subinterval_target_is_unbiased_and_the_naive_one_is_not():
    """The paper's 1-D toy: data N(1.5, 0.25); only x_s (s = 0.5) is known. Regressing the Eq. 15 target on x_t
    recovers E[x0 | x_t]; regressing "x_s as if clean" does not."""
    torch.manual_seed(0)
    sched, n, s, t = FlowSchedule(), 400_000, 0.5, 0.8
    x0 = 1.5 + 0.5 * torch.randn(n)
    x_s = (1 - s) * x0 + s * torch.randn(n)
    tau_s, tau_t = torch.full((n,), s), torch.full((n,), t)
    a_ts, s_ts = transition_coeffs(sched, tau_s, tau_t, x_s)
    eps = torch.randn(n)
    x_t = a_ts * x_s + s_ts * eps
    truth = fit_line(x_t, posterior_mean(x_t, t, 1.5, 0.25))
    target = subinterval_x0_target(x_s, eps, sched.alpha(tau_s), sched.sigma(tau_s), sched.alpha(tau_t), s_ts)
    unbiased, naive = fit_line(x_t, target), fit_line(x_t, x_s)
    assert torch.allclose(unbiased, truth, atol=0.02), (unbiased, truth)
    assert (naive - truth).abs().max() > 0.2, (naive, truth)
    # reduces to plain denoising at s = 0
    zero = torch.zeros(3)
    plain = subinterval_x0_target(torch.ones(3), torch.randn(3), sched.alpha(zero), sched.sigma(zero),
                                  sched.alpha(torch.full((3,), t)), torch.full((3,), t))  # fmt: skip
    assert torch.allclose(plain, torch.ones(3))


def test_velocity_and_x0_forms_agree_for_rectified_flow():
    """Eq. 12's velocity target is ``(x_t − x0*)/t`` with Eq. 15's x0 target."""
    torch.manual_seed(0)
    sched = FlowSchedule()
    s, t = torch.rand(64) * 0.5, 0.5 + torch.rand(64) * 0.5
    x_s, eps = torch.randn(64), torch.randn(64)
    a_ts, s_ts = transition_coeffs(sched, s, t, x_s)
    x_t = a_ts * x_s + s_ts * eps
    x0_star = subinterval_x0_target(x_s, eps, sched.alpha(s), sched.sigma(s), sched.alpha(t), s_ts)
    psi = subinterval_flow_target(x_s, eps, sched.alpha(s), sched.sigma(s), sched.alpha(t), sched.sigma(t), s_ts)
    assert torch.allclose(psi, (x_t - x0_star) / t, atol=1e-4)


def test_two_phase_experts_train_in_order_on_one_base():
    torch.manual_seed(0)
    teacher = Teacher.from_module(ToyNet(1.0), FlowSchedule(timestep_scale=1.0), "flow")
    student = Student.lora(teacher, rank=4, alpha=4, target_modules=["net.2", "net.4"])
    config = PhasedDMDConfig(real_guidance_scale=1.0, num_phases=2, steps_per_phase=1, phase_train_steps=[6, 6],
                             fake_steps_per_generator_step=1)  # fmt: skip
    objective = PhasedDMD(config, teacher, student)
    assert OBJECTIVES.get("phased_dmd") is PhasedDMD
    groups = objective.trainable()
    assert set(groups) == {"expert0", "expert1", "fake0", "fake1"}
    ids = [{id(p) for p in g.parameters()} for g in groups.values()]
    assert all(not a & b for i, a in enumerate(ids) for b in ids[i + 1 :]), "groups must be disjoint"
    phases = [objective.phase(step) for step in range(12)]
    assert phases[:6] == ["expert0", "fake0"] * 3 and phases[6:] == ["expert1", "fake1"] * 3

    opts = {k: torch.optim.AdamW(list(g.parameters()), lr=1e-2) for k, g in groups.items()}
    snapshot = {}
    for step, phase in enumerate(phases):
        if step == 6:
            snapshot = {k: p.detach().clone() for k, p in groups["expert0"].named_parameters()}
        out = objective.loss(Batch(cond=Conditioning(), x0=mixture(64)), step, phase)
        opts[phase].zero_grad(set_to_none=True)
        out.loss.backward()
        assert torch.isfinite(out.loss), (step, out.metrics)
        opts[phase].step()
        assert out.metrics["phase_index"] == (0 if step < 6 else 1)
    for k, p in groups["expert0"].named_parameters():  # frozen once phase 2 starts
        assert torch.equal(p, snapshot[k])
    moved = [p for k, p in groups["expert1"].named_parameters() if "lora_B" in k]
    assert any(p.abs().sum() > 0 for p in moved)

    noise = torch.randn(32, 2)
    x = objective.sampler()(noise, Conditioning(), 2, torch.Generator().manual_seed(0))
    assert x.shape == (32, 2) and torch.isfinite(x).all()


def test_wan22_phases_are_its_two_experts_and_other_settings_are_refused():
    """On Wan 2.2 the phases are the pipeline's experts (boundary_ratio), never a uniform split; 2 phases only."""
    with pytest.raises(ValueError, match="num_phases=3"):
        PhasedDMDConfig(phase_boundaries="pipeline", num_phases=3, phase_train_steps=[1, 1, 1])
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22"))
    student = Student.lora(teacher, rank=2)
    with pytest.raises(ValueError, match="straddle"):
        PhasedDMD(PhasedDMDConfig(phase_boundaries="uniform"), teacher, student)
    with pytest.raises(ValueError, match="num_phases=3"):
        PhasedDMD(PhasedDMDConfig(num_phases=3, phase_train_steps=[1, 1, 1]), teacher, student)
    wan21 = load_teacher(SimpleNamespace(pretrained="tiny:wan21"))
    with pytest.raises(ValueError, match="one backbone"):
        PhasedDMD(PhasedDMDConfig(phase_boundaries="pipeline"), wan21, Student.lora(wan21, rank=2))
