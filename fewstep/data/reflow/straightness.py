"""How straight a learned flow is (Liu et al. 2022, "Flow Straight and Fast", Eq. "straightness").

``S(v) = ∫₀¹ E‖(x_noise − x_data) − u(x_τ, τ)‖² dτ`` along the model's own ODE trajectory, with the flow velocity
``u = ε̂ − x̂0`` (for a flow model its output; for a VP model the velocity in ``(x̂0, ε̂)`` coordinates, constant along
a DDIM path exactly when the path is straight). ``S = 0`` iff every trajectory is a straight line, and then one
Euler / DDIM step lands on the multi-step endpoint. Reported as a per-element mean so it does not grow with size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.noise.convert import Prediction
from fewstep.noise.schedules import Schedule
from fewstep.solvers.steps import ddim_step

PredictFn = Callable[[Tensor, Tensor], Prediction]


@torch.no_grad()
def straightness(predict: PredictFn, schedule: Schedule, noise: Tensor, taus: Tensor) -> tuple[float, Tensor]:
    """``(S, x_end)``: the straightness of the trajectories from ``noise`` over the descending levels ``taus`` and
    their endpoints.

    Args:
        predict: ``(x [b, ...], τ [b]) -> Prediction`` (e.g. ``lambda x, t: denoiser(x, t, cond)`` or a teacher's
            guided ``predict``).
        schedule: the model's schedule.
        noise: ``[b, ...]`` starting points at ``taus[0]``.
        taus: ``num_steps + 1`` levels (many steps: the integral is a Riemann sum over them).
    """
    x = noise.float()
    velocities, widths = [], []
    for i in range(len(taus) - 1):
        tau = taus[i].float().expand(x.shape[0]).to(x.device)
        pred = predict(x, tau)
        velocities.append(pred.eps.float() - pred.x0.float())  # u = ε̂ − x̂0 (= dx/ds for flow)
        widths.append(float(taus[i] - taus[i + 1]))
        x = ddim_step(schedule, pred, taus[i + 1].float().expand(x.shape[0]).to(x.device))
    displacement = noise.float() - x  # the straight line from the endpoint to the noise
    total = sum(widths)
    s = sum(w * float(((displacement - u) ** 2).mean()) for w, u in zip(widths, velocities)) / total
    return s, x


def one_step_error(one_step: Tensor, reference: Tensor) -> float:
    """Mean squared distance between 1-step samples and the reference ODE endpoints for the same noise."""
    return float(((one_step.float() - reference.float()) ** 2).mean())
