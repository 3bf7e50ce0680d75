"""The pure TCD γ-step against diffusers' ``TCDScheduler.step``: the same formula, but ``tcd_step`` goes to the
continuous level ``τ_m = (1 − γ)·τ'`` where the scheduler rounds down to the integer timestep
``floor((1 − γ)·t_prev)``. (fewstep's ``TCDSampler`` loop rounds as the scheduler does and reproduces it exactly:
``tests/unit/objectives/test_pcm.py::test_sampler_equals_tcd_scheduler_loop``.)"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, TCDScheduler

from fewstep.noise.convert import to_x0_eps
from fewstep.noise.schedules import VPSchedule
from fewstep.solvers.steps import tcd_step

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def step_differences(gamma: float, num_steps: int) -> list[float]:
    """Max |tcd_step − TCDScheduler.step| per step of the ``num_steps`` grid, same state, ε̂ and noise."""
    schedule = VPSchedule.from_diffusers(DDPMScheduler(**SD_BETAS))
    scheduler = TCDScheduler(**SD_BETAS)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    gen = torch.Generator().manual_seed(0)
    x, eps_hat = torch.randn(4096, 4, generator=gen), torch.randn(4096, 4, generator=gen)
    diffs = []
    for i, (t, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        scheduler = TCDScheduler(**SD_BETAS)  # a fresh one steps from ``t`` (found in its timesteps)
        scheduler.set_timesteps(num_steps)
        theirs = scheduler.step(eps_hat, t, x, eta=gamma, generator=torch.Generator().manual_seed(i)).prev_sample
        tau, tau_prev = schedule.tau_from_model_timestep(t), schedule.tau_from_model_timestep(t_prev)
        pred = to_x0_eps(eps_hat, x, schedule.alpha(tau), schedule.sigma(tau), "epsilon")
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))  # what the scheduler draws
        diffs.append((tcd_step(schedule, pred, tau_prev, gamma, z) - theirs).abs().max().item())
    return diffs


def test_tcd_step_equals_the_scheduler_where_the_levels_are_integers():
    # 4-step grid 999 → 759 → 499 → 259: (1 − γ)·(t_prev + 1) is an integer for γ = 0.3 and 0.5
    for gamma in (0.3, 0.5):
        assert max(step_differences(gamma, 4)) < 1e-5


def test_tcd_step_differs_from_the_scheduler_by_the_rounded_level():
    """γ = 0.33 on the 8-step grid: the scheduler's level is up to one training index below the continuous one."""
    diffs = step_differences(0.33, 8)
    print("max |tcd_step − TCDScheduler.step| per step at γ = 0.33:", [f"{d:.1e}" for d in diffs])
    assert 4e-3 < max(diffs) < 6e-3, diffs  # measured 5.5e-3 on unit-variance states (SD's betas)
    assert min(diffs) < 1e-5  # 0.67·(t_prev + 1) happens to be an integer on one step
