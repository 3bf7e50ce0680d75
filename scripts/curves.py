"""Reference training curves: one small PNG per run directory with its loss and its objective's health metrics
(``fewstep.eval.curves.HEALTH_TAGS``) plus the periodic-evaluation FID, read from the run's TensorBoard logs.

    python scripts/curves.py runs/bench/digits_lcm                 # -> docs/curves/digits_lcm.png
    python scripts/curves.py RUN_DIR [RUN_DIR ...] [--out-dir docs/curves] [--name NAME]

The PNG is named after the run directory (the benchmark recipes' output_dir ends in the recipe's name) or ``--name``.
What each curve should look like is in docs/curves.md. Needs matplotlib (``pip install 'fewstep[plots]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewstep.eval.curves import HEALTH_TAGS, plot_curves, read_curves, read_recipe

REPO = Path(__file__).resolve().parents[1]
MAX_PANELS = 9
SIZE_WARNING_BYTES = 100_000  # docs/curves/*.png are committed: keep each small


def curve_tags(objective: str, logged: set[str]) -> list[str]:
    """The objective's loss and health metrics that the run logged, then its FID at each evaluated step count
    (``MAX_PANELS`` in all; the FID panels are kept)."""
    tags = [t for t in HEALTH_TAGS.get(objective, ("loss", "grad_norm/student")) if t in logged]
    fids = sorted((t for t in logged if t.startswith("eval/fid@")), key=lambda t: int(t.rsplit("@", 1)[1]))
    fids = fids[:MAX_PANELS]
    return tags[: MAX_PANELS - len(fids)] + fids


def write_curves(run_dir: Path, out_dir: Path, name: str | None = None) -> Path:
    """``<out_dir>/<name>.png`` for one run (``name``: the run directory's name by default)."""
    curves = read_curves(run_dir)
    recipe = read_recipe(run_dir) or {}
    objective = (recipe.get("objective") or {}).get("name", "?")
    name = name or run_dir.resolve().name
    last = max((c.steps[-1] for c in curves.values() if c.steps), default=0)
    title = f"{name}: {objective}, {last} steps (faint: raw; solid: smoothed 0.6; dots: periodic eval)"
    return plot_curves([(name, curves)], curve_tags(objective, set(curves)), out_dir / f"{name}.png", title=title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (output_dir)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "curves", help="default: docs/curves")
    parser.add_argument("--name", help="PNG name for a single run (default: the run directory's name)")
    args = parser.parse_args(argv)
    if args.name and len(args.runs) > 1:
        parser.error("--name needs exactly one RUN_DIR")
    for run_dir in args.runs:
        path = write_curves(run_dir, args.out_dir, args.name)
        size = path.stat().st_size
        big = size > SIZE_WARNING_BYTES
        note = f"  (over {SIZE_WARNING_BYTES // 1000} KB: fewer panels or a smaller dpi)" if big else ""
        print(f"{path}  {size / 1000:.0f} KB{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
