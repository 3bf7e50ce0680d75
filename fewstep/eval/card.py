"""The evaluation section of an exported student's model card: the eval report of exactly the exported weights.

``fewstep export`` passes ``evaluation_section`` to ``fewstep.export.export_run``, which calls it once the checkpoint
and weights are chosen. It looks for an ``eval.json`` under ``<run>/eval/`` made for the same training step and the
same weights (``ema`` or ``raw``): a ``fewstep eval RUN_DIR`` report (target kind ``run``), else one of the periodic
evaluations during training (``eval.every_steps``, target kind ``training``), the newest if several fit. A report of
another step or of the other weights describes other weights and is left out (logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fewstep.eval.periodic import read_best
from fewstep.eval.report import JSON_FILE, MARKDOWN_FILE, format_table, read_report
from fewstep.export.files import EVAL_DIR  # `fewstep eval TARGET` writes to TARGET/eval, periodic evaluation too
from fewstep.train.checkpoint import BEST, PREFIX

logger = logging.getLogger(__name__)


def checkpoint_step(checkpoint: str | Path, run_dir: str | Path) -> int | None:
    """The training step of a checkpoint directory (``step_XXXXXXXX``; ``best``: the step ``best.json`` names)."""
    name = Path(checkpoint).name
    if name == BEST:
        best = read_best(run_dir)
        return best.step if best is not None else None
    digits = name.removeprefix(PREFIX)
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def _same_path(a: Any, b: str | Path) -> bool:
    return isinstance(a, str) and Path(a).resolve() == Path(b).resolve()


def _evaluated(target: dict[str, Any], run_dir: Path) -> tuple[str, int | None, str] | None:
    """``(kind, step, weights)`` of a report's target when it is this run, else ``None``."""
    kind = target.get("kind")
    if kind == "run" and _same_path(target.get("path"), run_dir):
        return kind, checkpoint_step(target.get("checkpoint", ""), run_dir), target.get("weights")
    if kind == "training" and _same_path(target.get("run"), run_dir):
        return kind, target.get("step"), target.get("weights")
    return None


def find_run_report(source: dict[str, str]) -> Path | None:
    """The ``eval.json`` under ``<run>/eval/`` of the weights in ``source`` (``{"run", "checkpoint", "weights"}``,
    ``fewstep.train.run.LoadedRun.source()``): ``fewstep eval`` reports before periodic ones, newest first."""
    run_dir = Path(source["run"])
    step = checkpoint_step(source["checkpoint"], run_dir)
    found: list[tuple[bool, float, Path]] = []
    for path in sorted((run_dir / EVAL_DIR).rglob(JSON_FILE)) if (run_dir / EVAL_DIR).is_dir() else []:
        try:
            target = json.loads(path.read_text(encoding="utf-8")).get("target") or {}
        except (OSError, ValueError, AttributeError) as err:
            logger.info("Skipping %s: not a readable evaluation report (%s).", path, err)
            continue
        evaluated = _evaluated(target, run_dir) if isinstance(target, dict) else None
        if evaluated is None:
            continue
        kind, at_step, weights = evaluated
        if step is None or at_step != step or weights != source["weights"]:
            logger.info("Not on the model card: %s evaluated step %s (%s weights); the export is step %s (%s).",
                        path, at_step, weights, step, source["weights"])  # fmt: skip
            continue
        found.append((kind == "run", path.stat().st_mtime, path))
    return max(found)[2] if found else None


def evaluation_section(source: dict[str, str]) -> str | None:
    """The card's evaluation section (Markdown: where the numbers come from, then the table), or ``None`` when the
    run has no report of these weights (``find_run_report``)."""
    path = find_run_report(source)
    if path is None:
        return None
    report = read_report(path)
    info, target = report.info, report.info.get("target", {})
    made_by = "`fewstep eval`" if target.get("kind") == "run" else "the periodic evaluation during training"
    step = checkpoint_step(source["checkpoint"], source["run"])
    lines = [
        f"Measured by {made_by} on these weights (training step {step}, {source['weights']} weights): "
        f"{info.get('num_samples')} images per row, seed {info.get('seed')}; the full report is "
        f"`{path.with_name(MARKDOWN_FILE)}`.",
        "",
        format_table(report).rstrip("\n"),
    ]
    return "\n".join(lines)
