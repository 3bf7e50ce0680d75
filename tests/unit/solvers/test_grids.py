"""The sampling grids in ``fewstep.solvers.grids`` against diffusers' own schedulers and their stated numbers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from fewstep.noise.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule
from fewstep.noise.timesteps import TAU_EPS
from fewstep.solvers.grids import (
    dmd_student_taus,
    lcm_timesteps,
    linspace_grid,
    sampling_taus,
    segment_edges,
    skipping_grid,
    teacher_taus,
    trailing_vp_grid,
)

STEPS = (1, 2, 3, 4, 7, 8, 50)
FLUX_CONFIG = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
               "base_image_seq_len": 256, "max_image_seq_len": 4096}  # fmt: skip


def vp() -> VPSchedule:
    return VPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))


def diffusers_flow_sigmas(config: dict, num_steps: int, mu: float | None = None) -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler.sigmas`` for uniform sigmas ``1, 1 − 1/n, …, 1/n`` (plus its final 0)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist()
    scheduler.set_timesteps(sigmas=sigmas, **({} if mu is None else {"mu": mu}))
    return scheduler.sigmas.float()


@pytest.mark.parametrize("num_steps", STEPS)
def test_linspace_grid_ends_monotone_and_offset(num_steps):
    grid = linspace_grid(num_steps)
    assert grid.shape == (num_steps + 1,) and grid.dtype == torch.float32
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])
    assert torch.allclose(grid[:-1] - grid[1:], torch.full((num_steps,), 1 / num_steps))
    for offset in (-0.5, 0.3, 0.49):  # interior levels move toward tau_min by offset·step; the ends stay
        moved = linspace_grid(num_steps, 0.9, 0.1, offset)
        base = linspace_grid(num_steps, 0.9, 0.1)
        assert moved[0] == base[0] == pytest.approx(0.9) and moved[-1] == base[-1] == pytest.approx(0.1)
        assert torch.allclose(base[1:-1] - moved[1:-1], torch.full((num_steps - 1,), offset * 0.8 / num_steps))
        assert torch.all(moved[1:] < moved[:-1])


@pytest.mark.parametrize("num_steps", STEPS)
def test_trailing_vp_grid_is_diffusers_ddim_trailing(num_steps):
    schedule = vp()
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(num_steps)
    grid = trailing_vp_grid(num_steps)
    assert grid.shape == (num_steps + 1,) and grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.all(grid[1:] < grid[:-1])
    assert torch.equal(schedule.model_timestep(grid[:-1]), ref.timesteps.float())
    assert torch.equal(grid[:-1] * 1000 - 1, ref.timesteps.float())  # every level is a training index exactly


def test_trailing_vp_grid_offsets_move_by_whole_training_indices():
    assert (trailing_vp_grid(4) * 1000).tolist() == [1000, 750, 500, 250, 0]  # indices 999, 749, 499, 249
    moved = trailing_vp_grid(4, offset=0.3)  # 0.3 of a 250-index step: 75 indices toward the clean end
    assert torch.allclose(moved * 1000, torch.tensor([1000.0, 675, 425, 175, 0]))
    assert torch.allclose(trailing_vp_grid(4, offset=-0.5) * 1000, torch.tensor([1000.0, 875, 625, 375, 0]))
    assert torch.allclose(trailing_vp_grid(2, 100, offset=0.49) * 100, torch.tensor([100.0, 26, 0]))  # round(24.5)


@pytest.mark.parametrize("num_steps", STEPS)
def test_teacher_taus_vp_is_trailing_and_flow_is_the_schedulers_shifted_sigmas(num_steps):
    assert torch.equal(teacher_taus(vp(), num_steps), trailing_vp_grid(num_steps))
    assert torch.equal(teacher_taus(vp(), num_steps, offset=0.3), trailing_vp_grid(num_steps, offset=0.3))
    sd3 = {"shift": 3.0}
    taus = teacher_taus(FlowSchedule.from_diffusers(sd3), num_steps)
    assert torch.allclose(taus, diffusers_flow_sigmas(sd3, num_steps), atol=1e-6)
    assert taus[0] == 1.0 and taus[-1] == 0.0 and torch.all(taus[1:] < taus[:-1])
    assert torch.equal(teacher_taus(FlowSchedule(), num_steps), linspace_grid(num_steps))  # shift 1: uniform


@pytest.mark.parametrize("num_tokens", [16, 1024, 4096])
def test_teacher_taus_dynamic_shift_matches_flux_scheduler(num_tokens):
    schedule = FlowSchedule.from_diffusers(FLUX_CONFIG, timestep_scale=1.0)
    taus = teacher_taus(schedule, 4, num_tokens)
    expected = diffusers_flow_sigmas(FLUX_CONFIG, 4, mu=schedule.mu(num_tokens))
    assert torch.allclose(taus, expected, atol=1e-6)
    assert not torch.allclose(taus, teacher_taus(schedule, 4, 4 * num_tokens))  # the shift reads the token count
    with pytest.raises(ValueError, match="num_tokens"):
        teacher_taus(schedule, 4)


def test_teacher_taus_offset_keeps_both_ends_on_a_shifted_flow():
    schedule = FlowSchedule(shift_factor=3.0)
    grid = teacher_taus(schedule, 8)
    for offset in (-0.5, -0.2, 0.3, 0.49):
        moved = teacher_taus(schedule, 8, offset=offset)
        assert moved[0] == grid[0] and moved[-1] == grid[-1] and torch.all(moved[1:] < moved[:-1])
        assert torch.equal(moved, schedule.shift(linspace_grid(8, offset=offset)))


@pytest.mark.parametrize("num_steps", STEPS)
def test_sampling_taus_keeps_continuous_levels_off_one(num_steps):
    assert torch.equal(sampling_taus(vp(), num_steps), trailing_vp_grid(num_steps))  # VP: never clamped
    for schedule in (FlowSchedule(shift_factor=3.0), TrigFlowSchedule()):
        taus, exact = sampling_taus(schedule, num_steps), teacher_taus(schedule, num_steps)
        assert taus[0] == pytest.approx(1 - TAU_EPS) and taus[-1] == 0.0
        assert torch.equal(taus[1:], exact[1:].clamp(max=1 - TAU_EPS))


def test_dmd_student_taus():
    assert vp().model_timestep(dmd_student_taus(vp(), 4)).long().tolist() == [999, 749, 499, 249]  # DMD2 SDXL
    assert vp().model_timestep(dmd_student_taus(vp(), 3)).long().tolist() == [999, 666, 333]
    assert dmd_student_taus(FlowSchedule(), 4).tolist() == [1.0, 0.75, 0.5, 0.25]
    flux = FlowSchedule.from_diffusers(FLUX_CONFIG, timestep_scale=1.0)
    assert torch.allclose(dmd_student_taus(flux, 4, 1024), diffusers_flow_sigmas(FLUX_CONFIG, 4, flux.mu(1024))[:-1])
    with pytest.raises(ValueError, match="num_steps"):
        dmd_student_taus(vp(), 0)


@pytest.mark.parametrize("num_ddim", [50, 30])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_lcm_timesteps_and_segment_starts_are_lcm_scheduler_picks(num_ddim, num_steps):
    grid = skipping_grid(vp(), num_ddim)  # [num_ddim + 1] ascending
    assert grid[0] == pytest.approx(1 / 1000) and torch.all(grid[1:] > grid[:-1])
    ref = LCMScheduler(original_inference_steps=num_ddim)
    ref.set_timesteps(num_steps)
    picked = lcm_timesteps(grid, num_steps)
    assert vp().model_timestep(picked).long().tolist() == ref.timesteps.tolist()
    assert torch.equal(picked, grid[segment_edges(num_ddim, num_steps, starts=True)])
    with pytest.raises(ValueError, match="num_steps"):
        lcm_timesteps(grid, num_ddim + 1)
