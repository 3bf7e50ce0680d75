"""``Denoiser.dtype`` (what inputs are cast to) for backbones with parameters, with buffers only, and with neither:
a closed-form denoiser without weights is a valid custom teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import FlowSchedule

DATA_STD = 0.5


class GaussianFlow(nn.Module):
    """The exact rectified-flow velocity ``u = E[ε − x0 | x_t]`` for data ``N(0, s²)``: no parameters, no buffers.

    With ``x_t = (1 − t)·x0 + t·ε`` and ``r² = (1 − t)²s² + t²``: ``E[x0 | x_t] = (1 − t)s²/r²·x_t`` and
    ``E[ε | x_t] = t/r²·x_t``.
    """

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32  # the Denoiser casts inputs to its dtype
        t = timestep.float()[:, None]
        r2 = (1 - t) ** 2 * DATA_STD**2 + t**2
        return (t - (1 - t) * DATA_STD**2) / r2 * x


class ScaledByBuffer(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("steps", torch.arange(3))  # an integer buffer is not a compute dtype
        self.register_buffer("scale", torch.full((1,), 0.5, dtype=dtype))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        assert x.dtype == self.scale.dtype
        return x * self.scale


def test_dtype_of_a_module_without_parameters_or_buffers_is_float32():
    denoiser = Denoiser(GaussianFlow(), FlowSchedule(timestep_scale=1.0), "flow")
    assert denoiser.dtype == torch.float32
    x = torch.randn(4, 2, dtype=torch.float64)
    pred = denoiser(x, torch.full((4,), 0.5), Conditioning())
    assert pred.x0.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_of_a_module_with_buffers_only_is_its_first_floating_buffers(dtype):
    denoiser = Denoiser(ScaledByBuffer(dtype), FlowSchedule(timestep_scale=1.0), "flow")
    assert denoiser.dtype == dtype
    raw = denoiser.raw(torch.ones(2, 3), torch.full((2,), 0.5), Conditioning())
    assert raw.dtype == dtype and torch.equal(raw.float(), torch.full((2, 3), 0.5))


def test_dtype_of_a_module_with_parameters_is_its_first_parameters():
    linear = nn.Linear(2, 2).to(torch.bfloat16)
    linear.register_buffer("extra", torch.zeros(1, dtype=torch.float64))
    assert Denoiser(linear, FlowSchedule(), "flow").dtype == torch.bfloat16


def test_a_parameter_free_teacher_samples_its_data_distribution():
    """Euler on the exact velocity from ``N(0, 1)`` noise: the sample std approaches ``s`` as the steps grow."""
    teacher = Teacher.from_module(GaussianFlow(), FlowSchedule(timestep_scale=1.0), "flow")
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    out = teacher.sample(noise, Conditioning(), torch.linspace(1.0, 0.0, 201))
    assert abs(float(out.std() / noise.std()) - DATA_STD) < 0.01 * DATA_STD
