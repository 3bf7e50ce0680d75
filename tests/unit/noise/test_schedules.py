"""One shared suite swept over every schedule: conversions, steps, transitions, boundaries."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.noise import (
    EDMSchedule,
    FlowSchedule,
    TrigFlowSchedule,
    VPSchedule,
    from_x0_eps,
    schedule_from_diffusers,
    to_x0_eps,
    velocity,
)
from fewstep.noise.convert import Prediction
from fewstep.solvers.steps import ddim_step, noise_to, renoise_step, tcd_step, transition, transition_coeffs

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

SCHEDULES = {
    "vp": VPSchedule.from_diffusers(DDIMScheduler(**SD_BETAS, set_alpha_to_one=False)),
    "vp_linear": VPSchedule.from_diffusers(DDPMScheduler()),
    "flow": FlowSchedule(),
    "flux": FlowSchedule(timestep_scale=1.0, use_dynamic_shifting=True),
    "trigflow": TrigFlowSchedule(),
    "edm": EDMSchedule(),
}
# Prediction types each schedule can express (v/trigflow need α² + σ² = 1).
TYPES = {
    "vp": ["epsilon", "sample", "v_prediction", "trigflow"],
    "vp_linear": ["epsilon", "sample", "v_prediction"],
    "flow": ["epsilon", "sample", "flow"],
    "flux": ["epsilon", "sample", "flow"],
    "trigflow": ["epsilon", "sample", "v_prediction", "trigflow"],
    "edm": ["epsilon", "sample"],
}
CASES = [(s, t) for s in SCHEDULES for t in TYPES[s]]


def _state(schedule, b=64, shape=(3, 4, 4), lo=0.02, hi=0.98, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    tau = lo + (hi - lo) * torch.rand(b, generator=g)
    return x0, eps, tau


@pytest.mark.parametrize("name,ptype", CASES)
def test_conversions_round_trip(name, ptype):
    sch = SCHEDULES[name]
    x0, eps, tau = _state(sch)
    x = noise_to(sch, x0, eps, tau)
    a, s = sch.alpha(tau), sch.sigma(tau)
    pred = to_x0_eps(from_x0_eps(x0, eps, a, s, ptype), x, a, s, ptype)
    scale = 1 + x.abs().max()
    assert (pred.x0 - x0).abs().max() / scale < 1e-6 * 10
    assert (pred.eps - eps).abs().max() / scale < 1e-6 * 10


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_boundaries_and_monotone_snr(name):
    sch = SCHEDULES[name]
    tau = torch.linspace(0.0, 1.0, 201)
    a, s = sch.alpha(tau), sch.sigma(tau)
    assert a[0] == pytest.approx(1.0, abs=1e-6) and s[0] == pytest.approx(0.0, abs=1e-6)
    snr = (a / s.clamp(min=1e-12)) ** 2
    assert torch.all(snr[1:] <= snr[:-1] * (1 + 1e-5)), "SNR must fall as τ grows"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_derivatives_match_finite_differences(name):
    sch = SCHEDULES[name]
    tau = torch.linspace(0.1, 0.9, 17)
    h = 1e-3
    for f, df in ((sch.alpha, sch.d_alpha), (sch.sigma, sch.d_sigma)):
        fd = (f(tau + h) - f(tau - h)) / (2 * h)
        assert torch.allclose(df(tau), fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_model_timestep_inverse(name):
    sch = SCHEDULES[name]
    tau = torch.linspace(0.05, 0.95, 19)
    if name.startswith("vp"):  # VP rounds to its discrete grid: check on grid points
        tau = sch.tau_from_model_timestep(torch.arange(0, 1000, 37).float())
    back = sch.tau_from_model_timestep(sch.model_timestep(tau))
    assert torch.allclose(back, tau, atol=1e-5)


def test_vp_matches_diffusers_alphas_cumprod_on_grid():
    sched = DDIMScheduler(**SD_BETAS)
    sch = SCHEDULES["vp"]
    t = torch.tensor([0, 1, 250, 999])
    tau = sch.tau_from_model_timestep(t)
    assert torch.allclose(sch.alpha(tau).double() ** 2, sched.alphas_cumprod[t].double(), atol=1e-7)
    assert torch.equal(sch.model_timestep(tau), t.float())
    assert sch.final_tau() == pytest.approx(1 / 1000)  # SD's set_alpha_to_one=False ends on index 0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_step_is_exact_on_true_prediction_and_goes_both_ways(name):
    sch = SCHEDULES[name]
    x0, eps, tau = _state(sch)
    tau_to = tau * 0.5
    pred = Prediction(x0=x0, eps=eps)
    assert torch.allclose(ddim_step(sch, pred, tau_to), noise_to(sch, x0, eps, tau_to), atol=1e-5)
    assert torch.allclose(ddim_step(sch, pred, tau), noise_to(sch, x0, eps, tau), atol=1e-5)  # upwards too


def test_ddim_step_equals_flow_euler_step():
    sch = SCHEDULES["flow"]
    x0, eps, s = _state(sch)
    x = noise_to(sch, x0, eps, s)
    u = torch.randn_like(x)  # any velocity, not only the true one
    pred = to_x0_eps(u, x, sch.alpha(s), sch.sigma(s), "flow")
    s_to = s - 0.1
    euler = x + (s_to - s).view(-1, 1, 1, 1) * u
    assert torch.allclose(ddim_step(sch, pred, s_to), euler, atol=1e-5)


@pytest.mark.parametrize("name", ["vp", "trigflow", "flow"])
def test_ddim_step_matches_diffusers_ddim_and_flow_euler(name):
    """Our one-formula step equals the diffusers schedulers' own step on random model outputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.randn(2, 4, 8, 8, generator=g)
    if name == "flow":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(4)
        t = sched.timesteps[1]
        ref = sched.step(out, t, x, return_dict=False)[0]
        s, s_to = sched.sigmas[1], sched.sigmas[2]
        sch = SCHEDULES["flow"]
        ours = ddim_step(sch, to_x0_eps(out, x, sch.alpha(s), sch.sigma(s), "flow"), s_to)
    else:
        ptype = "epsilon" if name == "vp" else "v_prediction"
        sched = DDIMScheduler(**SD_BETAS, prediction_type=ptype, timestep_spacing="trailing", clip_sample=False)
        sched.set_timesteps(4)
        t = int(sched.timesteps[1])
        ref = sched.step(out, t, x, return_dict=False)[0]
        sch = SCHEDULES["vp"]
        tau, tau_to = sch.tau_from_model_timestep(torch.tensor(t)), sch.tau_from_model_timestep(torch.tensor(t - 250))
        ours = ddim_step(sch, to_x0_eps(out, x, sch.alpha(tau), sch.sigma(tau), ptype), tau_to)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_transition_kernel_moments_match_sampling(name):
    """x_t ~ p(x_t | x_s) composed with x_s ~ q(x_s | x0) must have the marginal moments of q(x_t | x0)."""
    sch = SCHEDULES[name]
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    tau_s, tau_t = torch.tensor(0.3), torch.tensor(0.6)
    x_s = noise_to(sch, x0, torch.randn(n, 1, generator=g), tau_s)
    x_t = transition(sch, x_s, tau_s, tau_t, torch.randn(n, 1, generator=g))
    a_t, s_t = float(sch.alpha(tau_t)), float(sch.sigma(tau_t))
    assert x_t.mean().item() == pytest.approx(a_t * 0.7, abs=4 * s_t / math.sqrt(n) + 1e-4)
    assert x_t.std().item() == pytest.approx(s_t, rel=1e-2)
    a_ts, s_ts = transition_coeffs(sch, tau_s, tau_t, x_s[:1])
    assert float(a_ts) == pytest.approx(a_t / float(sch.alpha(tau_s)), rel=1e-6)


def test_transition_closed_forms():
    """RF transition: α_{t|s} = (1−t)/(1−s); VP σ²_{t|s} = 1 − ᾱ_t/ᾱ_s."""
    like = torch.zeros(1, 1)
    a, s = transition_coeffs(SCHEDULES["flow"], 0.2, 0.7, like)
    assert float(a) == pytest.approx(0.3 / 0.8)
    assert float(s) ** 2 == pytest.approx(0.7**2 - (0.3 / 0.8) ** 2 * 0.2**2, rel=1e-5)
    vp = SCHEDULES["vp"]
    a, s = transition_coeffs(vp, 0.2, 0.7, like)
    acp_s, acp_t = float(vp.alpha(torch.tensor(0.2))) ** 2, float(vp.alpha(torch.tensor(0.7))) ** 2
    assert float(s) ** 2 == pytest.approx(1 - acp_t / acp_s, rel=1e-4)


def test_tcd_step_limits():
    sch = SCHEDULES["vp"]
    x0, eps, tau = _state(sch, b=8)
    pred = Prediction(x0=x0, eps=eps)
    z = torch.randn_like(x0)
    tau_to = tau * 0.5
    assert torch.allclose(tcd_step(sch, pred, tau_to, 0.0, z), ddim_step(sch, pred, tau_to))
    assert torch.allclose(tcd_step(sch, pred, tau_to, 1.0, z), renoise_step(sch, x0, tau_to, z), atol=1e-5)


@pytest.mark.parametrize("name", ["vp", "flow", "trigflow"])
def test_velocity_is_time_derivative_of_the_forward_path(name):
    sch = SCHEDULES[name]
    x0, eps, tau = _state(sch, b=8, lo=0.1, hi=0.9)
    h = 1e-3
    fd = (noise_to(sch, x0, eps, tau + h) - noise_to(sch, x0, eps, tau - h)) / (2 * h)
    v = velocity(Prediction(x0, eps), sch.d_alpha(tau), sch.d_sigma(tau))
    assert torch.allclose(v, fd, rtol=2e-2, atol=2e-2)


def test_flow_shift_static_and_dynamic():
    s = torch.linspace(0, 1, 11)
    k3 = FlowSchedule(shift_factor=3.0).shift(s)
    assert torch.allclose(k3, 3 * s / (1 + 2 * s))
    flux = SCHEDULES["flux"]
    mu = flux.mu(256)
    assert mu == pytest.approx(0.5)
    assert torch.allclose(flux.shift(s, num_tokens=256), math.exp(0.5) * s / (1 + (math.exp(0.5) - 1) * s))
    with pytest.raises(ValueError, match="num_tokens"):
        flux.shift(s)


def test_trigflow_equals_rf_at_equal_snr():
    """TrigFlow ↔ RF: u = s/(1−s) and x_trig = x_rf / sqrt((1−s)² + s²)."""
    s = torch.linspace(0.05, 0.95, 10)
    u = torch.atan(s / (1 - s))
    tf, rf = TrigFlowSchedule(), FlowSchedule()
    tau = u / (math.pi / 2)
    norm = torch.sqrt((1 - s) ** 2 + s**2)
    assert torch.allclose(tf.alpha(tau), rf.alpha(s) / norm, atol=1e-6)
    assert torch.allclose(tf.sigma(tau), rf.sigma(s) / norm, atol=1e-6)
    rcm = TrigFlowSchedule(rf_timestep=True)
    assert torch.allclose(rcm.model_timestep(tau), 1000 * s, atol=1e-3)


def test_schedule_from_diffusers_picks_family():
    assert isinstance(schedule_from_diffusers(DDIMScheduler()), VPSchedule)
    assert isinstance(schedule_from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0)), FlowSchedule)
    with pytest.raises(ValueError, match="not supported"):
        schedule_from_diffusers({"_class_name": "Mystery"})
