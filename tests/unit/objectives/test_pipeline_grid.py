"""The grid a sigma-less pipeline runs: ``scheduler_through`` makes a stock scheduler's own ``set_timesteps(K)`` the
DMD student grid; DMD2 trains and samples on those float32 levels only where the pipeline takes no ``sigmas=``."""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import pytest
import torch

from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.noise.schedules import FlowSchedule
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.objectives.dmd.sampler import dmd_pipeline_scheduler
from fewstep.objectives.pipeline_grid import GRID_TOLERANCE, pipeline_levels, scheduler_through, takes_sigmas
from fewstep.solvers.grids import dmd_student_taus
from tests.helpers import single_thread  # noqa: F401 (fixture)

BASE = dict(diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, stochastic_sampling=True).config)


@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])  # Wan 2.1 480p, TI2V-5B, A14B
@pytest.mark.parametrize("num_steps", [2, 3, 4, 8])
def test_scheduler_through_makes_the_pipeline_grid_the_dmd_grid(shift, num_steps):
    schedule = FlowSchedule(shift_factor=shift)
    target = dmd_student_taus(schedule, num_steps)
    config = scheduler_through({**BASE, "shift": shift}, target)
    assert config["use_dynamic_shifting"] is False and config["shift_terminal"] == pytest.approx(float(target[-1]))
    levels = pipeline_levels(config, schedule, num_steps)  # what WanPipeline's bare set_timesteps(K) gives
    assert (levels - target).abs().max() <= GRID_TOLERANCE
    default = pipeline_levels({**BASE, "shift": shift}, schedule, num_steps)  # the teacher's scheduler as it is
    assert (default - target).abs().max() > 0.1  # ends near 0: why the exported scheduler is solved


def test_scheduler_through_refuses_what_no_scheduler_runs():
    with pytest.raises(ValueError, match="shifted-uniform"):
        scheduler_through(BASE, torch.tensor([1.0, 0.9, 0.2, 0.1]))
    with pytest.raises(ValueError, match="pure noise"):
        scheduler_through(BASE, torch.tensor([0.9, 0.5]))


def test_a_terminal_stretched_scheduler_runs_no_single_step():
    config = scheduler_through({**BASE, "shift": 5.0}, dmd_student_taus(FlowSchedule(shift_factor=5.0), 4))
    assert pipeline_levels(config, FlowSchedule(shift_factor=5.0), 1) is None  # diffusers: 0/0 or the terminal level
    assert pipeline_levels({**config, "shift_terminal": None}, FlowSchedule(shift_factor=5.0), 1).tolist() == [1.0]


def test_takes_sigmas():
    assert takes_sigmas(diffusers.StableDiffusion3Pipeline) and takes_sigmas(diffusers.FluxPipeline)
    assert not takes_sigmas(diffusers.WanPipeline) and not takes_sigmas(diffusers.WanImageToVideoPipeline)
    assert not takes_sigmas(diffusers.LTXPipeline) and takes_sigmas(None)


@pytest.mark.parametrize("name", ["tiny:sd3", "tiny:wan21", "tiny:ltx"])
def test_dmd2_trains_on_the_grid_of_its_pipeline(name):
    teacher = load_teacher(SimpleNamespace(pretrained=name))
    objective = DMD2(DMD2Config(num_student_steps=4, fake_score="lora"), teacher, Student.lora(teacher, rank=2))
    shape = latent_shape(teacher, 1)
    ntok = 8 if name != "tiny:sd3" else None
    trained, sampled = objective.student_taus(shape), objective.sampler().timesteps(4, shape)
    assert trained.dtype == torch.float32 and torch.equal(trained, sampled)
    if name == "tiny:sd3":  # takes sigmas=: DMD2's grid, unchanged
        assert dmd_pipeline_scheduler(teacher, 4) is None
        assert torch.equal(trained, dmd_student_taus(teacher.schedule, 4))
        return
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(dmd_pipeline_scheduler(teacher, 4))
    if name == "tiny:ltx":  # LTXPipeline: linspace(1, 1/K, K) shifted by the token count it reads from the video
        scheduler.set_timesteps(sigmas=torch.linspace(1, 0.25, 4).tolist(), mu=teacher.schedule.mu(ntok))
    else:  # WanPipeline: the bare set_timesteps(K)
        scheduler.set_timesteps(4)
    assert torch.equal(trained, scheduler.sigmas[:4])  # bit for bit what the pipeline steps through
    assert (trained - dmd_student_taus(teacher.schedule, 4, ntok)).abs().max() <= GRID_TOLERANCE
