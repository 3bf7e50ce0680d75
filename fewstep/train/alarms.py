"""Collapse alarms: known failure modes of a distillation run, spotted from numbers the run already makes.

Two sources:

* the distribution-matching health metrics (``fewstep.objectives.dmd.health`` and the DMD objectives' losses):
  ``dm_grad_norm`` is the normalised gap between the fake and the real score at the generator's samples. Far above
  its early value (``gap_explode``) the fake score has lost track of the generator; far below (``gap_collapse``) the
  generator no longer gets a signal, typically because its samples left the range where the scores make sense.
  ``std_ratio`` (the generator's sample std over the teacher's) far below 1 once the run is under way
  (``washed_out``): the student's samples stayed at, or went back to, the blurred mean of its one-step start;
* the periodic sample grids (images ``[n, c, h, w]`` in ``[0, 1]``, one tensor per student step count): the variance
  across seeds falling against the first grid (``mode_collapse``), pixels piling up at the ends of the range
  (``saturation``) and flat frames (``solid``).

Each alarm fires once per episode: when its condition starts to hold, not again until it has cleared. Non-finite
losses are the step guard's business (``fewstep.train.loop``), not an alarm's. Thresholds: ``train.alarms``; what
each alarm means and which knob to turn: ``docs/troubleshooting.md``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

ADVICE = {  # alarm -> (likely cause, the recipe knobs to turn)
    "gap_explode": (
        "the fake score lags behind the generator (generator learning rate too high, too few fake-score updates) or "
        "the real branch's guidance is too strong",
        "lower the student's learning rate (optim.group_lr.student), raise objective.fake_steps_per_generator_step, "
        "lower objective.real_guidance_scale",
    ),
    "gap_collapse": (
        "the generator no longer gets a signal: its samples left the range where the two scores make sense (too high "
        "a learning rate) or the fake score has fitted a collapsed generator",
        "lower the student's learning rate (optim.group_lr.student), resume from an earlier checkpoint, add "
        "objective.regression_weight or objective.gan_weight",
    ),
    "washed_out": (
        "the student's samples have far less contrast than the teacher's: it has stayed at (or gone back to) the "
        "blurred mean its one-step prediction starts from, because the distribution-matching signal is too weak or "
        "the teacher's own score is blurred at the high noise levels (an undertrained teacher)",
        "check the teacher's few-step samples, raise the student's learning rate (optim.group_lr.student) or train "
        "longer, add objective.gan_weight or objective.regression_weight",
    ),
    "mode_collapse": (
        "the student maps different noise to nearly the same images (mode collapse)",
        "raise objective.fake_steps_per_generator_step, lower the guidance (objective.real_guidance_scale, "
        "teacher.guidance_scale), add objective.gan_weight or objective.regression_weight, lower optim.lr",
    ),
    "saturation": (
        "pixel values pile up at the ends of the range: the learning rate or the guidance is too high",
        "lower the guidance (objective.real_guidance_scale, teacher.guidance_scale), lower optim.lr, set "
        "optim.grad_clip",
    ),
    "solid": (
        "the student outputs flat frames: training diverged, or the latents decode badly in low precision",
        "lower optim.lr, resume from an earlier checkpoint, try teacher.dtype=float32 and train.mixed_precision=no",
    ),
}


@dataclass(frozen=True)
class Alarm:
    """One alarm firing: ``name`` (a key of ``ADVICE``), the ``step`` and what was measured (``what``)."""

    name: str
    step: int
    what: str

    @property
    def message(self) -> str:
        cause, knob = ADVICE[self.name]
        return f"ALARM {self.name} at step {self.step}: {self.what}. Likely cause: {cause}. Try: {knob}."


# --- detectors: pure functions of images [n, c, h, w] in [0, 1] -------------------------------------------------------


def seed_variance(images: Tensor) -> float:
    """Per-pixel variance across the ``n`` samples, averaged over pixels: 0 when every seed gives the same image."""
    x = images.detach().float().flatten(1)  # [n, D]
    return float(x.var(0, unbiased=False).mean()) if x.shape[0] > 1 else float("nan")


def saturated_share(images: Tensor, margin: float) -> float:
    """Share of pixel values within ``margin`` of 0 or 1."""
    x = images.detach().float()
    return float(((x <= margin) | (x >= 1 - margin)).float().mean())


def solid_share(images: Tensor, max_std: float) -> float:
    """Share of samples whose pixel std is at most ``max_std`` (solid or all-black frames)."""
    x = images.detach().float().flatten(1)  # [n, D]
    return float((x.std(1, unbiased=False) <= max_std).float().mean())


def gap_condition(current: float, reference: float, explode: float, collapse: float) -> str | None:
    """``gap_explode`` when ``current`` is above ``explode × reference``, ``gap_collapse`` below ``collapse ×
    reference``, else None."""
    if reference <= 0 or not math.isfinite(current):
        return None
    if current > explode * reference:
        return "gap_explode"
    if current < collapse * reference:
        return "gap_collapse"
    return None


# --- the monitor: references and episodes -----------------------------------------------------------------------------


class AlarmMonitor:
    """Keeps the references (the gap's early median, the first grid's seed variance) and which alarms are in an
    episode. ``metrics`` and ``samples`` return ``(fired, cleared)``: alarms that start an episode now, and names
    whose episode ended.

    Args:
        cfg: the recipe's ``train.alarms`` block.
    """

    GAP = "dm_grad_norm"

    def __init__(self, cfg: object) -> None:
        self.cfg = cfg
        self.active: set[str] = set()
        self._gap_early: list[float] = []  # the first `window` observations after the warm-up: the reference
        self._gap_recent: list[float] = []  # the last `window` observations: the current value
        self._std_recent: list[float] = []  # the last `window` std_ratio values after `washed_out_after`
        self._phase: float | None = None
        self._variance_reference: list[float] | None = None

    def metrics(self, step: int, metrics: dict[str, float]) -> tuple[list[Alarm], list[str]]:
        """Check the objective's metrics of optimizer step ``step`` (names as the objectives return them)."""
        phase = metrics.get("phase_index")
        if phase is not None and phase != self._phase:  # Phased DMD: a fresh fake score, a new reference
            self._phase, self._gap_early, self._gap_recent, self._std_recent = phase, [], [], []
            self.active -= {"gap_explode", "gap_collapse", "washed_out"}
        return self._episodes(step, {**self._gap_conditions(step, metrics), **self._contrast_conditions(step, metrics)})

    def _gap_conditions(self, step: int, metrics: dict[str, float]) -> dict[str, str | None]:
        """``gap_explode`` / ``gap_collapse`` from ``dm_grad_norm``; nothing while there is no reference yet."""
        cfg, value = self.cfg, metrics.get(self.GAP)
        if value is None or not math.isfinite(value) or step < cfg.warmup_steps:
            return {}
        if len(self._gap_early) < cfg.window:
            self._gap_early.append(value)
        self._gap_recent = [*self._gap_recent, value][-cfg.window :]
        if len(self._gap_early) < cfg.window:
            return {}
        reference, current = statistics.median(self._gap_early), statistics.median(self._gap_recent)
        state = gap_condition(current, reference, cfg.gap_explode, cfg.gap_collapse)
        what = f"{self.GAP} {current:.3g} against {reference:.3g} early in the run ({current / reference:.3g}x)"
        return {n: what if n == state else None for n in ("gap_explode", "gap_collapse")}

    def _contrast_conditions(self, step: int, metrics: dict[str, float]) -> dict[str, str | None]:
        """``washed_out`` from ``std_ratio`` (the median of its last ``window`` values) from ``washed_out_after`` on:
        a one-step student starts as the teacher's one-step prediction, which may be blurred, so earlier values say
        nothing."""
        cfg, value = self.cfg, metrics.get("std_ratio")
        if value is None or not math.isfinite(value) or step < cfg.washed_out_after:
            return {}
        self._std_recent = [*self._std_recent, value][-cfg.window :]
        if len(self._std_recent) < cfg.window:
            return {}
        current = statistics.median(self._std_recent)
        what = (
            f"std_ratio {current:.3g}: the student's samples have {current:.2g}x the pixel std of the teacher's own "
            f"(threshold {cfg.washed_out_std_ratio:g}x)"
        )
        return {"washed_out": what if current < cfg.washed_out_std_ratio else None}

    def samples(self, step: int, rows: list[Tensor]) -> tuple[list[Alarm], list[str]]:
        """Check a sample grid: ``rows`` of images ``[n, c, h, w]`` in ``[0, 1]`` (one per student step count)."""
        cfg = self.cfg
        rows = [torch.nan_to_num(r.detach().float().cpu(), nan=0.0) for r in rows]  # NaN shows black in the PNG too
        images = torch.cat(rows)
        conditions: dict[str, str | None] = {}
        variances = [seed_variance(r) for r in rows]
        if self._variance_reference is None:
            self._variance_reference = variances
        ratios = [v / ref for v, ref in zip(variances, self._variance_reference) if ref > 0 and math.isfinite(v)]
        low = min(ratios, default=math.inf)
        conditions["mode_collapse"] = (
            f"the variance across seeds fell to {low:.3g}x its value at the first sample grid"
            if low < cfg.variance_collapse
            else None
        )
        share, margin = saturated_share(images, cfg.saturation_margin), cfg.saturation_margin
        conditions["saturation"] = (
            f"{share:.0%} of pixels are within {margin:g} of 0 or 1 (threshold {cfg.saturation_share:.0%})"
            if share >= cfg.saturation_share
            else None
        )
        solid = solid_share(images, cfg.solid_std)
        conditions["solid"] = (
            f"{solid:.0%} of the samples are flat (pixel std <= {cfg.solid_std:g})"
            if solid >= cfg.solid_share
            else None
        )
        return self._episodes(step, conditions)

    def _episodes(self, step: int, conditions: dict[str, str | None]) -> tuple[list[Alarm], list[str]]:
        """Fire the conditions that start to hold, clear the ones that stopped; a name not given stays as it was."""
        fired = [Alarm(name, step, what) for name, what in conditions.items() if what and name not in self.active]
        cleared = [name for name, what in conditions.items() if not what and name in self.active]
        self.active = (self.active | {a.name for a in fired}) - set(cleared)
        return fired, cleared
