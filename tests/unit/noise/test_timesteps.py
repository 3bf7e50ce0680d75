import math

import pytest
import torch

from fewstep.noise import timesteps


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "fn", [timesteps.uniform, timesteps.logit_normal, timesteps.lognormal_sigma, timesteps.u_shaped]
)
def test_samplers_in_range_and_reproducible(fn):
    a, b = fn(1000, _g(1)), fn(1000, _g(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == (1000,)


def test_logit_normal_median_and_u_shape():
    t = timesteps.logit_normal(20000, _g(), mean=0.0, std=1.0)
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    u = timesteps.u_shaped(20000, _g(), a=4.0)
    ends = ((u < 0.1) | (u > 0.9)).float().mean().item()
    middle = ((u > 0.4) & (u < 0.6)).float().mean().item()
    assert ends > 2 * middle  # more mass at the ends (rfpp)
    # exact CDF check at one point: F(0.25) = (sinh(a(0.25-0.5)) + sinh(a/2)) / (2 sinh(a/2))
    cdf = (math.sinh(4 * -0.25) + math.sinh(2)) / (2 * math.sinh(2))
    assert (u < 0.25).float().mean().item() == pytest.approx(cdf, abs=0.01)


def test_lognormal_sigma_matches_edm_median():
    tau = timesteps.lognormal_sigma(20000, _g(), p_mean=-1.1, p_std=2.0)
    sigma = torch.tan(tau * math.pi / 2)
    assert torch.log(sigma).median().item() == pytest.approx(-1.1, abs=0.05)


def test_discrete_draws_from_grid():
    grid = torch.tensor([0.1, 0.5, 0.9])
    tau, idx = timesteps.discrete(grid, 100, _g())
    assert torch.equal(tau, grid[idx])
