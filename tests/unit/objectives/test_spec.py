"""``SamplingSpec``: the write / read round trip, the diffusers scheduler configs it builds (they load with
``from_pretrained`` and give back the recorded timesteps / sigmas), and the errors for missing or bad files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import FlowSchedule, TrigFlowSchedule, VPSchedule
from fewstep.objectives.consistency.lcm import LCM, LCMConfig
from fewstep.objectives.spec import (
    SPEC_FILE,
    SamplingSpec,
    flow_euler_spec,
    flow_renoise_spec,
    lcm_vp_spec,
    read_schedule,
    teacher_scheduler_config,
    write_schedule,
)
from tests.helpers import (
    Echo,
    single_thread,  # noqa: F401 (fixture)
)

COMMON = dict(objective="lcm", recommended_steps=4, guidance_scale=1.0, guidance_convention="w = 1 is off")


@pytest.fixture(scope="module")
def sd15() -> Teacher:
    return load_teacher(SimpleNamespace(pretrained="tiny:sd15"))


@pytest.fixture(scope="module")
def sd3() -> Teacher:
    return load_teacher(SimpleNamespace(pretrained="tiny:sd3"))


def lcm_spec(teacher: Teacher) -> SamplingSpec:
    """The spec an LCM student of ``teacher`` exports (timesteps / sigmas computed by the objective)."""
    torch.manual_seed(0)
    return LCM(LCMConfig(w_min=0.0, w_max=0.0), teacher, Student.full(teacher)).sampling_spec()


def test_vp_spec_round_trips_and_its_lcm_scheduler_gives_the_recorded_timesteps(sd15, tmp_path):
    spec = lcm_spec(sd15)
    assert spec.scheduler_class == "LCMScheduler" and sorted(spec.steps) == [1, 2, 4, 8]
    assert spec.steps[4]["timesteps"] == [999, 759, 499, 259]  # LCM's 50-step skipping grid, 4 picks

    path = write_schedule(spec, tmp_path)
    assert path == tmp_path / SPEC_FILE
    on_disk = json.loads(path.read_text())
    assert sorted(on_disk["steps"]) == ["1", "2", "4", "8"]  # JSON keys are strings
    assert read_schedule(tmp_path) == spec  # and come back as ints

    scheduler = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert scheduler.config.original_inference_steps == 50 and scheduler.config.timestep_scaling == 10.0
    assert not scheduler.config.clip_sample and not scheduler.config.thresholding
    assert scheduler.config.prediction_type == sd15.denoiser.prediction_type
    # the teacher's betas survive: the same ᾱ as the teacher's own scheduler
    assert torch.allclose(scheduler.alphas_cumprod, sd15.pipeline.scheduler.alphas_cumprod)
    for num_steps, entry in spec.steps.items():
        scheduler.set_timesteps(**{k: v for k, v in spec.call_kwargs(num_steps).items() if k != "guidance_scale"})
        assert scheduler.timesteps.tolist() == entry["timesteps"], num_steps
    assert spec.call_kwargs(2) == {"guidance_scale": 1.0, "num_inference_steps": 2}


def test_flow_spec_round_trips_and_its_euler_scheduler_gives_the_recorded_levels(sd3, tmp_path):
    spec = lcm_spec(sd3)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    write_schedule(spec, tmp_path)
    assert read_schedule(tmp_path) == spec
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert scheduler.config.stochastic_sampling is True  # predict x̂0, then re-noise
    assert scheduler.config.shift == sd3.pipeline.scheduler.config.shift
    for num_steps, entry in spec.steps.items():
        kwargs = spec.call_kwargs(num_steps)
        assert kwargs["sigmas"] == entry["sigmas"] and "num_inference_steps" not in kwargs
        scheduler.set_timesteps(sigmas=kwargs["sigmas"])
        # the scheduler's own shift maps the passed sigmas to the levels the student was trained at
        assert torch.allclose(scheduler.sigmas[:-1], torch.tensor(entry["levels"]), atol=1e-6), num_steps
        assert scheduler.sigmas[-1] == 0


def test_deterministic_flow_spec_and_extra_call_kwargs(sd3, tmp_path):
    levels = {2: [1.0, 0.5]}
    spec = flow_euler_spec(sd3, {2: [1.0, 0.25]}, levels, note="one Euler step per segment", **COMMON)
    spec.extra_call_kwargs = {"eta": 0.3}
    assert spec.notes[-1] == "one Euler step per segment"
    assert spec.call_kwargs(2) == {"guidance_scale": 1.0, "sigmas": [1.0, 0.25], "eta": 0.3}
    write_schedule(spec, tmp_path)
    assert read_schedule(tmp_path).extra_call_kwargs == {"eta": 0.3}
    assert (
        FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler").config.stochastic_sampling
        is False
    )
    renoise = flow_renoise_spec(sd3, {2: [1.0, 0.25]}, levels, max_c_skip=3e-4, **COMMON)
    assert "c_skip <= 3.0e-04" in renoise.notes[0]


def test_custom_vp_teacher_gets_a_config_with_its_own_betas(tmp_path):
    """A pipeline-less teacher: the config is synthesised from its schedule (β_n = 1 − ᾱ_n / ᾱ_{n−1})."""
    schedule = VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    teacher = Teacher.from_module(Echo(), schedule, "v_prediction")
    config = teacher_scheduler_config(teacher)
    assert config["prediction_type"] == "v_prediction" and config["set_alpha_to_one"] is True
    rebuilt = DDPMScheduler.from_config(config)
    assert torch.allclose(rebuilt.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-6)

    spec = lcm_vp_spec(teacher, {1: [999], 2: [999, 499]}, 50, 10.0, **COMMON)
    write_schedule(spec, tmp_path)
    scheduler = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert torch.allclose(scheduler.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-6)
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]


def test_custom_flow_teacher_config_carries_the_shift():
    teacher = Teacher.from_module(Echo(), FlowSchedule(shift_factor=3.0, timestep_scale=1.0), "flow")
    config = teacher_scheduler_config(teacher)
    assert config["shift"] == 3.0 and config["use_dynamic_shifting"] is False
    assert FlowMatchEulerDiscreteScheduler.from_config(config).config.shift == 3.0


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No {SPEC_FILE} in .*export the student"):
        read_schedule(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(ValueError):  # json.JSONDecodeError
        read_schedule(tmp_path)
    spec = SamplingSpec(scheduler_class="LCMScheduler", scheduler_config={}, steps={1: {"timesteps": [999]}}, **COMMON)
    with pytest.raises(ValueError, match=r"No exported schedule for 3 steps; exported: \[1\]"):
        spec.call_kwargs(3)
    trig = Teacher.from_module(Echo(), TrigFlowSchedule(), "trigflow")
    with pytest.raises(ValueError, match="No diffusers scheduler describes a 'trigflow' schedule"):
        teacher_scheduler_config(trig)
