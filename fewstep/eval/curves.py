"""A run's training curves: its TensorBoard scalars, smoothed and read at evenly spaced steps, plus what else two
runs are compared by (their saved recipes, their last evaluation report) and a PNG of the curves.

Used by ``fewstep compare`` and ``scripts/curves.py``. The trainer logs through accelerate's TensorBoard tracker into
``<run>/fewstep/events.out.tfevents.*``: ``loss``, ``grad_norm/<group>``, ``lr/<group>``, ``nonfinite_steps``, the
objective's own ``metrics/<name>`` and, with ``eval.every_steps``, ``eval/<metric>@<steps>``.

Smoothing is TensorBoard's: an exponential moving average with its start-up bias removed, so the first points are
not pulled towards 0 and the smoothed curve of a constant is that constant. Curves with few points (periodic
evaluation, ``SPARSE_POINTS``) are shown raw, point by point: each point is a measurement, not a noisy sample.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fewstep.eval.report import JSON_FILE, EvalReport, read_report

EVENT_PATTERN = "events.out.tfevents.*"
RECIPE_FILE = "resolved_config.yaml"  # written by the trainer into every run directory
SMOOTHING = 0.6  # TensorBoard's default slider value
SPARSE_POINTS = 20  # a curve with at most this many points (periodic evaluation) is shown raw, point by point
PLOTS_EXTRA = "plots"  # pyproject's optional dependencies that bring matplotlib
MISSING = object()  # a recipe key one run has and the other lacks

# What ``scripts/curves.py`` plots per objective: the loss and the objective's health metrics (docs/curves.md).
HEALTH_TAGS: dict[str, tuple[str, ...]] = {
    "diffusion": ("loss", "grad_norm/student"),
    "dmd2": ("metrics/loss_dm", "metrics/loss_fake", "metrics/loss_gan_d", "metrics/d_real_acc", "metrics/std_ratio",
             "metrics/diversity_ratio", "metrics/mean_drift", "grad_norm/student", "grad_norm/fake_score"),
    "phased_dmd": ("metrics/loss_dm", "metrics/loss_fake", "metrics/phase_index", "metrics/diversity",
                   "metrics/sample_std"),
    "lcm": ("loss", "grad_norm/student"),
    "pcm": ("metrics/consistency", "metrics/adv_g", "metrics/dmd", "metrics/segments", "grad_norm/student"),
    "scm": ("metrics/scm_mse", "loss", "metrics/g_norm", "metrics/tangent_r", "grad_norm/student"),
    "rcm": ("metrics/scm/scm_mse", "metrics/scm/g_norm", "metrics/dmd/loss", "metrics/dmd/g_abs",
            "metrics/critic/loss", "grad_norm/student", "grad_norm/fake_score"),
    "tbcm": ("metrics/scm_mse", "loss", "metrics/g_norm", "metrics/tangent_r", "grad_norm/student"),
    "reflow": ("loss", "grad_norm/student", "metrics/anneal_beta"),
    "instaflow": ("metrics/distill", "metrics/flow_guidance", "grad_norm/student"),
    "guidance_distill": ("loss", "grad_norm/student"),
    "agd": ("loss", "grad_norm/student", "metrics/buffer_states"),
}  # fmt: skip


class MissingExtra(ImportError):
    """An optional dependency is not installed; ``fewstep`` prints the message as one ``error:`` line (status 2)."""

    exit_status = 2


@dataclass
class Curve:
    """One scalar of a run: ``values[i]`` was logged at ``steps[i]`` (ascending, one value per step)."""

    tag: str
    steps: list[int]
    values: list[float]

    def smoothed(self, weight: float = SMOOTHING) -> list[float]:
        return smooth(self.values, weight)

    def at(self, step: int, weight: float = SMOOTHING, tolerance: int = 0) -> float | None:
        """The smoothed value at the last logged step ``<= step``; ``None`` before the first logged step or more than
        ``tolerance`` steps after the last."""
        if not self.steps or step < self.steps[0] or step > self.steps[-1] + tolerance:
            return None
        return self.smoothed(weight)[bisect.bisect_right(self.steps, step) - 1]

    def exact(self, step: int) -> float | None:
        """The raw value logged at ``step``, or ``None``."""
        return self.values[self.steps.index(step)] if step in self.steps else None

    @property
    def sparse(self) -> bool:
        """Few points (periodic evaluation): smoothing would only blur them, so they are shown raw."""
        return len(self.steps) <= SPARSE_POINTS

    @property
    def last(self) -> tuple[int, float]:
        """``(step, value)`` of the last logged point (raw, not smoothed)."""
        return self.steps[-1], self.values[-1]


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: ``m ← w·m + (1 − w)·v`` divided by ``1 − w^n`` (the start-up bias of ``m = 0``).

    A non-finite value is passed through and does not enter the average. ``weight`` in ``[0, 1)``; 0 is no smoothing.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1); got {weight}.")
    out, mean, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        mean, count = weight * mean + (1.0 - weight) * value, count + 1
        out.append(mean / (1.0 - weight**count))
    return out


def event_files(run_dir: str | Path) -> list[Path]:
    """Every TensorBoard event file under ``run_dir`` (any depth), sorted."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory; give a run directory (a recipe's output_dir).")
    return sorted(root.rglob(EVENT_PATTERN))


def read_curves(run_dir: str | Path) -> dict[str, Curve]:
    """Every scalar a run logged, by tag.

    Several event files (a resumed run writes a new one) are read in order; where a resume logged a step again, the
    later values replace the earlier ones from that step on (TensorBoard's purge of orphaned data).

    Raises:
        ValueError: ``run_dir`` is not a directory or holds no event file.
    """
    files = event_files(run_dir)
    if not files:
        raise ValueError(
            f"{run_dir}: no TensorBoard event files ({EVENT_PATTERN}) under it; give a fewstep run directory (the "
            "recipe's output_dir) that trained at least train.log_every steps."
        )
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    points: dict[str, list[tuple[float, int, float]]] = {}
    for directory in sorted({f.parent for f in files}):
        acc = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    return {tag: _purged(tag, events) for tag, events in sorted(points.items())}


def _purged(tag: str, events: list[tuple[float, int, float]]) -> Curve:
    """One value per step, in step order: in wall-time order, a step at or below an earlier one drops the earlier
    points from that step on (what a resumed run logged again)."""
    kept: list[tuple[int, float]] = []
    for _, step, value in sorted(events, key=lambda e: e[0]):
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, float(value)))
    return Curve(tag, [s for s, _ in kept], [v for _, v in kept])


def even_steps(curves: Sequence[Curve], count: int) -> list[int]:
    """``count`` evenly spaced steps from the first to the last step any of ``curves`` logged (fewer if the range
    holds fewer steps)."""
    logged = [c for c in curves if c.steps]
    if not logged or count < 1:
        return []
    first, last = min(c.steps[0] for c in logged), max(c.steps[-1] for c in logged)
    if count == 1 or first == last:
        return [last]
    return sorted({round(first + (last - first) * i / (count - 1)) for i in range(count)})


def read_recipe(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's saved recipe (``resolved_config.yaml``, every default filled in), or ``None`` if it has none."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a recipe (a YAML mapping); the run directory is damaged.")
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"optim.lr": 0.0002, ...}``; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def recipe_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every dotted key whose values differ (``MISSING`` where absent)."""
    flat_a, flat_b = flatten(a), flatten(b)
    keys = sorted(set(flat_a) | set(flat_b))
    return [(k, flat_a.get(k, MISSING), flat_b.get(k, MISSING)) for k in keys
            if flat_a.get(k, MISSING) != flat_b.get(k, MISSING)]  # fmt: skip


def last_report(run_dir: str | Path) -> tuple[Path, EvalReport] | None:
    """The run's last evaluation: ``eval/eval.json`` (``fewstep eval RUN``) if present, else the report of the
    highest step of periodic evaluation (``eval/step_XXXXXXXX/eval.json``); ``None`` if it has neither."""
    root = Path(run_dir) / "eval"
    candidates = [root / JSON_FILE] + sorted(root.glob(f"step_*/{JSON_FILE}"), reverse=True)
    for path in candidates:
        if path.is_file():
            try:
                return path, read_report(path)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}: not a readable evaluation report ({err}).") from err
    return None


def plt_module() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a ``MissingExtra`` naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingExtra(
            f"PNG plots need matplotlib: pip install 'fewstep[{PLOTS_EXTRA}]' (or pip install matplotlib)."
        ) from err
    return plt


def plot_curves(
    runs: Sequence[tuple[str, dict[str, Curve]]],
    tags: Sequence[str],
    out: str | Path,
    title: str = "",
    smoothing: float = SMOOTHING,
    columns: int = 3,
    dpi: int = 72,
) -> Path:
    """One panel per tag with every run's raw curve (faint) and smoothed curve (sparse curves: raw points joined);
    tags no run logged are left out.

    Args:
        runs: ``(label, curves)`` per run, curves from ``read_curves``.
        tags: the scalars to draw, in panel order.
        out: the PNG to write (its directory is created).
    """
    plt = plt_module()
    shown = [t for t in tags if any(t in curves and curves[t].steps for _, curves in runs)]
    if not shown:
        raise ValueError(f"none of the metrics {list(tags)} was logged by {[label for label, _ in runs]}.")
    cols = min(columns, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes.flat, shown):
        for k, (label, curves) in enumerate(runs):
            curve = curves.get(tag)
            if curve is None or not curve.steps:
                continue
            color = colors[k % len(colors)]
            if curve.sparse:
                ax.plot(curve.steps, curve.values, color=color, linewidth=1.4, marker="o", markersize=3, label=label)
                continue
            ax.plot(curve.steps, curve.values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(curve.steps, curve.smoothed(smoothing), color=color, linewidth=1.4, label=label)
        ax.set_title(tag, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi)
    plt.close(fig)
    from PIL import Image

    # A 64-colour palette keeps every line and halves to thirds the file of a plot of dense raw curves.
    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, format="PNG", optimize=True)
    return path
