"""The multi-step samplers on Gaussian data ``x0 ~ N(0, s²·I)``, whose exact denoiser is known in closed form.

With ``x = α·x0 + σ·ε`` and ``r² = α²s² + σ²``: ``E[x0 | x] = α·s²/r²·x`` and ``E[ε | x] = σ/r²·x``. The probability
flow ODE maps ``N(0, 1)`` noise to ``N(0, s²)`` data; DDIM (η = 0) with the exact denoiser multiplies ``x`` by
``(α'·α·s² + σ'·σ)/r²`` per step, which is at most ``r'/r`` (Cauchy–Schwarz) and tends to it as the steps shrink.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from fewstep.noise.convert import Prediction
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.solvers.samplers import sample_consistency, sample_ddim

DATA_STD = 0.5


def gaussian_predict(schedule, data_std: float = DATA_STD, calls: list | None = None):
    """The exact ``(E[x0 | x_τ], E[ε | x_τ])`` for data ``N(0, data_std²)`` as a sampler's ``predict`` callable."""

    def predict(x: torch.Tensor, tau: torch.Tensor) -> Prediction:
        assert tau.shape == (x.shape[0],) and tau.dtype == torch.float32
        if calls is not None:
            calls.append(tau.clone())
        a, s = schedule.alpha(tau)[:, None], schedule.sigma(tau)[:, None]
        r2 = a**2 * data_std**2 + s**2
        return Prediction(x0=a * data_std**2 / r2 * x, eps=s / r2 * x)

    return predict


def ddim_gain(schedule, taus: torch.Tensor, data_std: float = DATA_STD) -> float:
    """The product of the per-step DDIM factors ``(α'·α·s² + σ'·σ) / r²`` (float64)."""
    a, s = schedule.alpha(taus).double(), schedule.sigma(taus).double()
    r2 = a**2 * data_std**2 + s**2
    return float(torch.prod((a[1:] * a[:-1] * data_std**2 + s[1:] * s[:-1]) / r2[:-1]))


def uniform_taus(num_steps: int) -> torch.Tensor:
    """``num_steps + 1`` levels, uniform in τ from pure noise (1) to clean (0)."""
    return torch.linspace(1.0, 0.0, num_steps + 1)


SCHEDULES = {
    "flow": lambda: FlowSchedule(timestep_scale=1.0),
    "vp": lambda: VPSchedule.from_diffusers(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ),  # fmt: skip
}


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_ddim_is_the_closed_form_product_of_its_steps(kind):
    schedule = SCHEDULES[kind]()
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    for num_steps in (1, 3, 10):
        taus = uniform_taus(num_steps)
        calls: list[torch.Tensor] = []
        out = sample_ddim(gaussian_predict(schedule, calls=calls), schedule, noise, taus)
        assert out.dtype == torch.float32 and out.shape == noise.shape
        assert torch.allclose(out, ddim_gain(schedule, taus) * noise, rtol=1e-4, atol=1e-6)
        # one prediction per step, at the step's starting level (never at the final level)
        assert [float(c[0]) for c in calls] == pytest.approx(taus[:-1].tolist())


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_ddim_at_many_steps_converges_to_the_data_variance(kind):
    """The ODE maps ``x_τ0 ~ N(0, r(τ0)²)`` to ``N(0, s²)``, so from unit noise the exact std is ``s / r(τ0)`` (flow:
    ``r(1) = 1``; VP: ``ᾱ(1) ≈ 0.0047`` leaves ``r(1) ≈ 0.998``). DDIM's std falls short by O(1/steps)."""
    schedule = SCHEDULES[kind]()
    tau_0 = torch.ones(1)
    exact = DATA_STD / float((schedule.alpha(tau_0) ** 2 * DATA_STD**2 + schedule.sigma(tau_0) ** 2).sqrt())
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    errors = []
    for num_steps in (2, 8, 32, 256):
        out = sample_ddim(gaussian_predict(schedule), schedule, noise, uniform_taus(num_steps))
        errors.append(exact - float(out.std() / noise.std()))
    assert all(e > 0 for e in errors) and errors == sorted(errors, reverse=True), errors
    # VP's log-SNR moves fastest near the clean end, where a uniform τ grid is coarse: a larger error constant
    assert errors[-1] < {"flow": 0.01, "vp": 0.02}[kind] * exact, errors
    assert errors[2] / errors[3] > 5, errors  # first order: 8× the steps, ~8× smaller error
    assert math.isclose(ddim_gain(schedule, uniform_taus(4096)), exact, rel_tol=2e-3)


def test_ddim_with_a_one_point_denoiser_is_exact_in_one_step():
    """Point-mass data (s = 0): every DDIM step lands on the ODE, so one step gives the data exactly."""
    schedule = SCHEDULES["flow"]()
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    for num_steps in (1, 5):
        out = sample_ddim(gaussian_predict(schedule, data_std=0.0), schedule, noise, uniform_taus(num_steps))
        assert out.abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_consistency_sampling_renoises_with_the_given_generator(kind):
    """Predict x̂0 at each level, re-noise to the next with ``randn(generator)``; return the last x̂0."""
    schedule = SCHEDULES[kind]()
    predict = gaussian_predict(schedule)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    taus = torch.tensor([1.0, 0.75, 0.5, 0.25])

    out = sample_consistency(predict, schedule, noise, taus, torch.Generator().manual_seed(7))
    again = sample_consistency(predict, schedule, noise, taus, torch.Generator().manual_seed(7))
    other = sample_consistency(predict, schedule, noise, taus, torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.allclose(out, other)

    # the same loop written out: the generator is drawn len(taus) - 1 times, each a [b, ...] standard normal
    gen = torch.Generator().manual_seed(7)
    x = noise
    for i, tau in enumerate(taus):
        x0 = predict(x, tau.expand(16)).x0
        if i + 1 < len(taus):
            z = torch.randn(noise.shape, generator=gen)
            a, s = schedule.alpha(taus[i + 1]), schedule.sigma(taus[i + 1])
            x = a * x0 + s * z
    assert torch.allclose(out, x0, atol=1e-6)


def test_consistency_sampling_at_one_step_draws_no_noise():
    schedule = SCHEDULES["flow"]()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(9)
    out = sample_consistency(gaussian_predict(schedule), schedule, noise, torch.tensor([1.0]), gen)
    assert torch.allclose(out, gaussian_predict(schedule)(noise, torch.ones(16)).x0)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=torch.Generator().manual_seed(9)))
