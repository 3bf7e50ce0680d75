"""The canonical parameterisation: schedules, conversions between prediction types, time samplers."""

from fewstep.noise import timesteps
from fewstep.noise.convert import PREDICTION_TYPES, Prediction, from_x0_eps, score, to_x0_eps, velocity
from fewstep.noise.schedules import (
    EDMSchedule,
    FlowSchedule,
    Schedule,
    TrigFlowSchedule,
    VPSchedule,
    schedule_from_diffusers,
)

__all__ = [
    "PREDICTION_TYPES",
    "EDMSchedule",
    "FlowSchedule",
    "Prediction",
    "Schedule",
    "TrigFlowSchedule",
    "VPSchedule",
    "from_x0_eps",
    "schedule_from_diffusers",
    "score",
    "timesteps",
    "to_x0_eps",
    "velocity",
]
