"""The grid a stock pipeline runs when it cannot be given the student's levels.

``WanPipeline`` and ``WanImageToVideoPipeline`` take no ``sigmas=`` and call ``scheduler.set_timesteps(K)`` bare;
``LTXPipeline`` takes no ``sigmas=`` either and passes ``linspace(1, 1/K, K)`` to its scheduler itself (its
``timesteps=`` argument raises in diffusers 0.42: the pipeline passes its sigmas as well). A few-step student of such a
pipeline reproduces there only if it is trained and sampled on the levels the exported scheduler produces inside the
pipeline at ``num_inference_steps=K``: ``pipeline_levels`` computes them exactly as the pipeline does (float32,
``fewstep.solvers.grids.scheduler_taus``), and the exported scheduler is chosen so that they are the grid wanted:

* ``scheduler_through``: a static-shift ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(K)`` *is* a given
  shifted-uniform grid (a DMD student's ``shift(1 − i/K)``): its grid ``stretch(shift_S(linspace(1, a, K)))`` is a
  Möbius map of the step index, as is the target, so matching the first, second and last level matches them all.
  The two knobs are ``shift`` (solved) and ``shift_terminal`` (the last level).
* ``bisect_shift``: the one-knob solve (``shift`` alone) for any statistic of the grid that rises with the shift
  (Wan 2.2's Phased DMD puts its expert switch between two levels).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from fewstep.models.teacher import GUIDANCE_CONVENTION
from fewstep.noise.schedules import Schedule
from fewstep.objectives.spec import SamplingSpec
from fewstep.solvers.grids import scheduler_taus

GRID_TOLERANCE = 1e-5  # a solved grid within this of its target (float32 bisection lands within a few ulps)


def takes_sigmas(pipeline: Any) -> bool:
    """Whether a pipeline (instance or class) can be given the levels (``sigmas=`` in its ``__call__``). ``None``
    (a custom teacher, sampled by fewstep only) counts as yes: nothing constrains its grid."""
    if pipeline is None:
        return True
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    return "sigmas" in inspect.signature(cls.__call__).parameters


def runs_own_grid(pipeline: Any) -> bool:
    """Whether a student of ``pipeline`` must be sampled on the grid its exported scheduler runs there: a text
    pipeline (``prompt`` in its ``__call__``) that takes no ``sigmas=`` (``WanPipeline``, ``LTXPipeline``). Pixel
    pipelines (``DDPMPipeline``) take none either, but their export writes the sampling loop out, at any levels."""
    if pipeline is None or takes_sigmas(pipeline):
        return False
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    return "prompt" in inspect.signature(cls.__call__).parameters


def pipeline_levels(
    config: dict[str, Any], schedule: Schedule, num_steps: int, num_tokens: int | None = None
) -> Tensor | None:
    """The ``num_steps`` input levels a sigma-less pipeline runs with the ``FlowMatchEulerDiscreteScheduler`` of
    ``config`` at ``num_inference_steps=num_steps`` (float32, as the pipeline computes them; a dynamically shifted one
    reads ``num_tokens``, as ``LTXPipeline`` does). ``None`` where that scheduler cannot run ``num_steps`` steps:
    diffusers' ``shift_terminal`` stretch of a one-level grid divides ``1 − σ_0`` by itself (0/0, or, where float32
    leaves ``σ_0`` a hair below 1, the terminal level instead of 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps == 1 and config.get("shift_terminal"):
        return None
    taus = scheduler_taus(FlowMatchEulerDiscreteScheduler.from_config(config), schedule, num_steps, num_tokens)
    return taus[:num_steps]


def _grid(config: dict[str, Any], num_steps: int) -> Tensor:
    """``set_timesteps(num_steps)``'s input levels of a static-shift scheduler (no token count involved)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas[:num_steps]


def bisect_shift(
    config: dict[str, Any], num_steps: int, statistic: Callable[[Tensor], float], target: float
) -> dict[str, Any]:
    """``config`` with the static ``shift`` at which ``statistic(levels)`` of its ``num_steps``-step grid meets
    ``target`` (bisection on log-shift over ``[1e-3, 1e6]``; ``statistic`` must rise with the shift, as every level
    does). The caller checks the grid it gets."""

    def at(log_shift: float) -> dict[str, Any]:
        return {**config, "shift": math.exp(log_shift)}

    lo, hi = math.log(1e-3), math.log(1e6)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if statistic(_grid(at(mid), num_steps)) < target else (lo, mid)
    return at((lo + hi) / 2)


def scheduler_through(config: dict[str, Any], levels: Tensor) -> dict[str, Any]:
    """A static-shift ``FlowMatchEulerDiscreteScheduler`` config (from ``config``) whose ``set_timesteps(K)`` gives
    ``levels`` (``[K]``, descending from 1; a shifted-uniform grid such as ``dmd_student_taus``): ``shift_terminal``
    is the last level and ``shift`` is solved so that the second level matches, which matches every level (module
    docstring). One level needs neither (every grid starts at 1); two need no solve.

    Raises:
        ValueError: ``levels`` do not start at 1, or no such scheduler reproduces them (not a shifted-uniform grid).
    """
    levels = levels.float()
    if float(levels[0]) != 1.0:
        raise ValueError(f"A pipeline's own grid starts at pure noise (σ = 1); got levels {levels.tolist()}.")
    key = tuple(sorted((k, v) for k, v in config.items() if not isinstance(v, (list, dict))))
    return dict(_solve_through(key, tuple(levels.tolist())))


@lru_cache(maxsize=64)
def _solve_through(key: tuple[tuple[str, Any], ...], levels: tuple[float, ...]) -> tuple[tuple[str, Any], ...]:
    base, k = dict(key), len(levels)
    if k == 1:
        return tuple({**base, "use_dynamic_shifting": False}.items())
    base.update(use_dynamic_shifting=False, shift_terminal=levels[-1])
    config = base if k == 2 else bisect_shift(base, k, lambda s: float(s[1]), levels[1])
    got = _grid(config, k)
    if (got - torch.tensor(levels)).abs().max() > GRID_TOLERANCE:
        raise ValueError(
            f"No FlowMatchEulerDiscreteScheduler shift and shift_terminal give the levels {list(levels)} at {k} "
            f"steps (closest: {got.tolist()}): only shifted-uniform grids can be a sigma-less pipeline's own."
        )
    return tuple(config.items())


def pipeline_grid_spec(
    config: dict[str, Any], schedule: Schedule, steps: tuple[int, ...], trained_steps: int, objective: str, note: str
) -> SamplingSpec:
    """The ``SamplingSpec`` of a re-noising student of a sigma-less pipeline: ``num_inference_steps`` with the
    exported scheduler (``config``, stochastic) gives the trained levels. ``steps`` lists the step counts the scheduler
    can run (``pipeline_levels``), each with its ``timesteps`` and ``levels`` (a dynamically shifted scheduler's before
    the resolution shift, which the pipeline applies from the video's token count)."""
    dynamic = bool(config.get("use_dynamic_shifting"))
    table = {}
    for n in steps:
        if dynamic:  # LTXPipeline: linspace(1, 1/K, K), then the shift by the token count it reads from the video
            levels = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64).float()
        else:
            levels = pipeline_levels(config, schedule, n)
            if levels is None:
                continue
        table[n] = {"timesteps": (levels * config["num_train_timesteps"]).tolist(), "levels": levels.tolist()}
    skipped = sorted(set(steps) - set(table))
    where = (
        "levels shown before the pipeline's shift by the video's token count, which fewstep's sampler applies too"
        if dynamic
        else "its shift and shift_terminal are solved for it"
    )
    notes = [
        f"The pipeline takes no `sigmas=`: pass num_inference_steps={trained_steps} with the exported "
        f"FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), whose own grid is the student's ({where}).",
        "It re-noises between steps from the global RNG: call torch.manual_seed(seed) before sampling.",
    ]
    if skipped:
        notes.append(
            f"Not exported for {', '.join(map(str, skipped))} step(s): diffusers' shift_terminal stretch is undefined "
            "for a one-level grid. For one step (σ = 1) load the scheduler with shift_terminal=None, e.g. "
            'FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", shift_terminal=None).'
        )
    return SamplingSpec(
        objective=objective, scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=dict(config),
        recommended_steps=trained_steps, guidance_scale=1.0, guidance_convention=f"{GUIDANCE_CONVENTION}; {note}",
        steps=table, notes=notes,
    )  # fmt: skip


__all__ = [
    "GRID_TOLERANCE",
    "bisect_shift",
    "pipeline_grid_spec",
    "pipeline_levels",
    "runs_own_grid",
    "scheduler_through",
    "takes_sigmas",
]
