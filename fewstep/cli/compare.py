"""``fewstep compare RUN_A RUN_B [--metrics loss,...] [--points N] [--smoothing W] [--out FILE.png]``

Two training runs side by side, from what they wrote to disk: each metric's smoothed curve at evenly spaced steps
(TensorBoard event files), the last logged values, each run's last evaluation report (``eval/eval.json`` or the
newest ``eval/step_*/eval.json``) and the recipe keys whose values differ (``resolved_config.yaml``). With ``--out``
the curves are also drawn to a PNG (needs matplotlib: ``pip install 'fewstep[plots]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_POINTS = 10


def _names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated metric names such as loss,eval/fid@4; got {text!r}")
    return names


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "compare", parents=parents, help="compare two runs: curves, final values, eval reports, recipe differences",
        description="Print two training runs side by side: each metric's smoothed curve at evenly spaced steps (from "
        "their TensorBoard logs), the last values, each run's last evaluation report and the recipe keys that differ.",
    )  # fmt: skip
    parser.add_argument("run_a", metavar="RUN_A", help="a run directory (a recipe's output_dir)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run directory to compare it with")
    parser.add_argument("--metrics", type=_names, default=None,
                        help="comma-separated scalar names (default: loss and every eval/<metric>@<steps> both runs "
                        "logged); e.g. loss,grad_norm/student,metrics/std_ratio")  # fmt: skip
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS,
                        help=f"rows per curve table: evenly spaced steps (default {DEFAULT_POINTS})")  # fmt: skip
    parser.add_argument("--smoothing", type=float, default=None,
                        help="TensorBoard's smoothing weight in [0, 1) (default 0.6; 0 = raw values)")  # fmt: skip
    parser.add_argument("--out", metavar="FILE.png", help="also draw the curves to this PNG (needs matplotlib)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fewstep.eval import curves as C  # lazy: the parser alone imports nothing heavy

    smoothing = C.SMOOTHING if args.smoothing is None else args.smoothing
    C.smooth([], smoothing)  # a bad weight fails before anything is read
    if args.points < 1:
        raise ValueError(f"--points must be at least 1; got {args.points}.")
    if args.out:
        C.plt_module()  # a missing matplotlib fails before anything is read
    runs = [(label, Path(path), C.read_curves(path)) for label, path in (("A", args.run_a), ("B", args.run_b))]
    metrics = args.metrics or default_metrics([curves for _, _, curves in runs])
    unknown = [m for m in metrics if not any(m in curves for _, _, curves in runs)]
    if unknown:
        logged = sorted(set().union(*(curves for _, _, curves in runs)))
        raise ValueError(f"neither run logged {', '.join(unknown)}; they logged: {', '.join(logged)}.")

    for label, path, curves in runs:
        recipe = C.read_recipe(path) or {}
        objective = (recipe.get("objective") or {}).get("name", "?")
        last = max((c.steps[-1] for c in curves.values() if c.steps), default=0)
        print(f"{label}: {path}  (objective {objective}, logged up to step {last})")
    for metric in metrics:
        print()
        print(curve_table(metric, runs, args.points, smoothing))
    print()
    print(final_table(metrics, runs))
    for label, path, _ in runs:
        print()
        print(report_section(label, path))
    print()
    print(recipe_section(runs[0][1], runs[1][1]))
    if args.out:
        out = C.plot_curves([(f"{label}: {path}", curves) for label, path, curves in runs], metrics, args.out,
                            smoothing=smoothing)  # fmt: skip
        print(f"\nplot: {out}")
    return 0


def default_metrics(curve_sets: list[dict[str, Any]]) -> list[str]:
    """``loss`` and every ``eval/<metric>@<steps>`` both runs logged (not the running best or the timing)."""
    common = set(curve_sets[0]).intersection(*curve_sets[1:])
    evals = sorted(t for t in common if t.startswith("eval/") and "@" in t and not t.startswith("eval/best_"))
    return ["loss", *evals]


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns two spaces apart: the first ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "–" if value is None else format(value, ".4g")


def curve_table(metric: str, runs: list[tuple[str, Path, dict[str, Any]]], points: int, smoothing: float) -> str:
    """``metric`` of every run at ``points`` evenly spaced steps, smoothed (``–`` before a run's first point or a row
    past its last). A sparse metric (periodic evaluation) is shown raw: at each logged step if those are at most
    ``points``, else the last value at or before each row's step."""
    from fewstep.eval.curves import even_steps

    curves = [r[2].get(metric) for r in runs]
    present = [c for c in curves if c is not None]
    logged = sorted({s for c in present for s in c.steps})
    sparse = all(c.sparse for c in present)
    if sparse and len(logged) <= points:
        title = f"{metric} (raw, every logged step)"
        rows = [[str(s), *[_num(c.exact(s) if c is not None else None) for c in curves]] for s in logged]
    else:
        weight = 0.0 if sparse else smoothing
        title = f"{metric} (smoothed, weight {weight:g})" if weight > 0 else f"{metric} (raw)"
        steps = even_steps(present, points)
        gap = steps[1] - steps[0] if len(steps) > 1 else 0  # a curve that ends within a row of the end still counts
        rows = [[str(s), *[_num(c.at(s, weight, gap) if c is not None else None) for c in curves]] for s in steps]
    return title + "\n" + _table(["step", *[label for label, _, _ in runs]], rows, left=0)


def final_table(metrics: list[str], runs: list[tuple[str, Path, dict[str, Any]]]) -> str:
    """The last logged (raw) value of each metric and its step, per run."""
    rows = []
    for metric in metrics:
        cells = [metric]
        for _, _, curves in runs:
            curve = curves.get(metric)
            cells.append("–" if curve is None or not curve.steps else f"{_num(curve.last[1])} @ {curve.last[0]}")
        rows.append(cells)
    return "final values (raw, at the last logged step)\n" + _table(["metric", *[r[0] for r in runs]], rows)


def report_section(label: str, run_dir: Path) -> str:
    from fewstep.eval.curves import last_report
    from fewstep.eval.report import format_table

    found = last_report(run_dir)
    if found is None:
        return f"eval report {label}: none (no eval/eval.json or eval/step_*/eval.json; `fewstep eval {run_dir}`)"
    path, report = found
    return f"eval report {label}: {path}\n" + format_table(report).rstrip()


def recipe_section(run_a: Path, run_b: Path) -> str:
    from fewstep.eval.curves import MISSING, RECIPE_FILE, read_recipe, recipe_diff

    a, b = read_recipe(run_a), read_recipe(run_b)
    missing = [str(p) for p, r in ((run_a, a), (run_b, b)) if r is None]
    if missing:
        return f"recipe differences: no {RECIPE_FILE} in {', '.join(missing)}"
    diff = recipe_diff(a, b)
    if not diff:
        return f"recipe differences ({RECIPE_FILE}): none"
    rows = [[key, _yaml(va, MISSING), _yaml(vb, MISSING)] for key, va, vb in diff]
    return f"recipe differences ({RECIPE_FILE})\n" + _table(["key", "A", "B"], rows, left=3)


def _yaml(value: Any, missing: object, max_chars: int = 48) -> str:
    """A recipe value as it reads in YAML (flow style, cut to ``max_chars``), ``(absent)`` for a key the run lacks."""
    if value is missing:
        return "(absent)"
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
