"""The reports of an evaluation: its rows (``Row``, ``EvalReport``), tables, grids and JSON.

One row type serves every table fewstep prints: ``fewstep eval`` and periodic evaluation (``format_table``,
``eval.md``, ``eval.json``), the quickstart (``format_benchmark_table``, ``benchmark_record``) and the benchmark
scripts. A row is one model at one step count, or a data row (real images: no steps, no timing).

Files: ``eval.json`` (every number and comparability field), ``eval.md`` (the table and the same fields as a list),
one sample grid per row (``grids/``) and the overview ``grid.png``, PNGs per image (``images/``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fewstep.data.images import save_sample_grid

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
GRID_FILE = "grid.png"
NO_VALUE = "–"  # a cell without a number (data rows have no steps, NFE or timing)


@dataclass
class Row:
    """One line of a report: one model at one step count, or real images (``num_steps`` ``None``).

    Attributes:
        model: the row label, e.g. ``"teacher (DDIM, w=2)"``.
        num_steps: sampling steps (``None``: a data row).
        num_images: images the metrics saw.
        nfe_per_image: network evaluations per image (``None``: not counted).
        seconds_per_image: sampling wall time per image (``None``: not timed).
        peak_memory_mib: peak memory of the row (``None``: not measured).
        metrics: ``{metric name: value}``.
        schedule: the timesteps / levels of this step count.
        images_dir, grid: where the row's PNGs and grid were written (relative to the report).
        preview: the first images ``[k, c, h, w]`` in ``[0, 1]`` (for grids; not serialised).
    """

    model: str
    num_steps: int | None
    num_images: int
    nfe_per_image: float | None
    seconds_per_image: float | None
    peak_memory_mib: float | None
    metrics: dict[str, float]
    schedule: dict[str, Any] = field(default_factory=dict)
    images_dir: str | None = None
    grid: str | None = None
    preview: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "preview"}


@dataclass
class EvalReport:
    """An evaluation's rows and everything that makes them comparable (``info``, the ``eval.json`` header)."""

    rows: list[Row]
    info: dict[str, Any]
    out_dir: Path | None = None

    def value(self, metric: str, model: str, num_steps: int) -> float:
        """One number of the table, e.g. ``report.value("fid", "student (lcm, ema)", 4)``."""
        for row in self.rows:
            if row.model == model and row.num_steps == num_steps:
                return row.metrics[metric]
        raise KeyError(f"No row {model!r} at {num_steps} steps; rows: {[(r.model, r.num_steps) for r in self.rows]}.")

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "rows": [r.to_dict() for r in self.rows]}


def jsonable(value: Any) -> Any:
    """Tensors to lists, paths to strings, anything else unknown to its ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def slug(text: str) -> str:
    """A file-name-safe form of a row label: ``"teacher (DDIM, w=2)"`` → ``"teacher_ddim_w_2"``."""
    return re.sub(r"[^a-z0-9.]+", "_", text.lower()).strip("_") or "model"


def write_report(report: EvalReport, out_dir: str | Path, save_grid: bool = True) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` (and, with ``save_grid``, one grid per row and the overview grid).

    Returns:
        ``(json_path, markdown_path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.out_dir = out_dir
    if save_grid:
        _write_grids(report, out_dir)
    json_path = out_dir / JSON_FILE
    json_path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path = out_dir / MARKDOWN_FILE
    md_path.write_text(format_report(report), encoding="utf-8")
    return json_path, md_path


def read_report(path: str | Path) -> EvalReport:
    """An ``eval.json`` back as an ``EvalReport`` (rows and header; non-finite numbers, written as strings, as
    floats again), e.g. to print its table with ``format_table``.

    Raises:
        ValueError: the file is not a report written by ``write_report``.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not an evaluation report (no rows): pass an eval.json written by `fewstep eval`.")
    names = {f.name for f in fields(Row)} - {"preview"}
    rows = []
    for row in data["rows"]:
        values = {k: v for k, v in row.items() if k in names}
        for key in ("nfe_per_image", "seconds_per_image", "peak_memory_mib"):
            values[key] = _number(values.get(key))
        values["metrics"] = {k: _number(v) for k, v in (values.get("metrics") or {}).items()}
        rows.append(Row(**values))
    return EvalReport(rows, {k: v for k, v in data.items() if k != "rows"}, path.parent)


def _number(value: Any) -> Any:
    """``"nan"`` / ``"inf"`` (how ``jsonable`` writes non-finite floats) back to floats; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def write_row_images(row: Row, images: Tensor, out_dir: Path, name: str) -> None:
    """``images/<name>/00000.png ...`` (``images``: ``[n, c, h, w]`` uint8); clips ``[n, c, f, h, w]`` as one video
    each, ``00000.mp4 ...`` (``.webp`` without PyAV: ``fewstep.data.video``)."""
    from PIL import Image

    folder = out_dir / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:
        from fewstep.data.video import default_video_format, write_video

        suffix = default_video_format()
        for i, clip in enumerate(images):
            write_video(clip.permute(1, 2, 3, 0).numpy(), folder / f"{i:05d}.{suffix}")  # [f, h, w, c]
        row.images_dir = str(folder.relative_to(out_dir))
        return
    for i, image in enumerate(images):
        pixels = image.permute(1, 2, 0).numpy()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / f"{i:05d}.png")
    row.images_dir = str(folder.relative_to(out_dir))


def _write_grids(report: EvalReport, out_dir: Path) -> None:
    slugs = unique_slugs([r.model for r in report.rows])
    previews = [r.preview for r in report.rows if r.preview is not None and len(r.preview)]
    for row in report.rows:
        if row.preview is not None and len(row.preview):
            name = slugs[row.model] + ("" if row.num_steps is None else f"_{row.num_steps}steps")
            grid = save_sample_grid([row.preview], out_dir / "grids" / f"{name}.png")
            row.grid = str(grid.relative_to(out_dir))
    if previews:
        save_sample_grid(_same_size(previews), out_dir / GRID_FILE)
        report.info["overview_grid"] = GRID_FILE


def unique_slugs(models: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for model in dict.fromkeys(models):
        base, candidate, k = slug(model), slug(model), 2
        while candidate in out.values():
            candidate, k = f"{base}_{k}", k + 1
        out[model] = candidate
    return out


def _same_size(previews: list[Tensor]) -> list[Tensor]:
    """Grid rows of one shape: as many tiles each (the fewest), the largest size (nearest), RGB if any row is."""
    k = min(p.shape[0] for p in previews)
    h = max(p.shape[-2] for p in previews)
    w = max(p.shape[-1] for p in previews)
    c = max(p.shape[1] for p in previews)
    out = []
    for p in previews:
        p = p[:k]
        if p.shape[-2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode="nearest")
        out.append(p.expand(-1, c, -1, -1) if p.shape[1] != c else p)
    return out


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return NO_VALUE
    return format(value, spec) if math.isfinite(value) else str(value)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def format_table(report: EvalReport) -> str:
    """The rows as a markdown table: model, steps, NFE, each metric (arrow: better direction), ms / image, memory."""
    metrics = report.info.get("metrics", {})
    arrows = {name: "↑" if d.get("higher_is_better") else "↓" for name, d in metrics.items()}
    names = list(metrics) or sorted({k for r in report.rows for k in r.metrics})
    head = ["model", "steps", "NFE", *[f"{m} {arrows.get(m, '')}".strip() for m in names], "ms / image", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for r in report.rows:
        cells = [r.model, _steps(r), _fmt(r.nfe_per_image, "g")]
        cells += [_fmt(r.metrics.get(m), ".4g") for m in names]
        cells += [_fmt(_scaled(r.seconds_per_image, 1000), ".3g"), _fmt(r.peak_memory_mib, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _steps(row: Row) -> str:
    return _steps_of(row.num_steps)


def _steps_of(num_steps: int | None) -> str:
    return NO_VALUE if num_steps is None else str(num_steps)


# The benchmark table (the quickstart's): FID and accuracy of the benchmark classifier, seconds per 1,000 images.
BENCHMARK_COLUMNS = (("fid", "FID ↓", ".2f"), ("accuracy", "accuracy ↑", ".3f"))


def format_benchmark_table(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """The rows as the benchmark's markdown table (model, steps, FID, accuracy, s / 1,000 images), then ``notes``
    (one line each)."""
    head = ["model", "steps", *[title for _, title, _ in BENCHMARK_COLUMNS], "s / 1,000 images"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r.model, _steps(r), *[_fmt(r.metrics.get(name), spec) for name, _, spec in BENCHMARK_COLUMNS]]
        cells.append(_fmt(_scaled(r.seconds_per_image, 1000), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"


def benchmark_record(row: Row) -> dict[str, Any]:
    """One row of the benchmark table as JSON: ``model``, ``num_steps``, ``fid``, ``accuracy``,
    ``seconds_per_1k_images``, ``num_images``."""
    return {
        "model": row.model,
        "num_steps": row.num_steps,
        **{name: row.metrics.get(name) for name, _, _ in BENCHMARK_COLUMNS},
        "seconds_per_1k_images": _scaled(row.seconds_per_image, 1000),
        "num_images": row.num_images,
    }


def format_report(report: EvalReport) -> str:
    """``eval.md``: the table, then every field that makes its numbers comparable."""
    info = report.info
    env = info.get("environment", {})
    out = ["# Evaluation", "", format_table(report)]
    if info.get("warnings"):
        out += ["## Warnings", "", *[f"- {w}" for w in info["warnings"]], ""]
    out += ["## How these numbers were made", ""]
    out.append(
        f"- {info.get('num_samples')} images per row; seed {info.get('seed')}; batch size {info.get('batch_size')}."
    )
    out.append(f"- noise: {info.get('noise')}.")
    inputs = info.get("inputs", {})
    if inputs.get("kind") == "class labels":
        out.append(
            f"- conditioning: class labels 0..{len(inputs['per_class']) - 1} cycled (per class: {inputs['per_class']})."
        )
    elif inputs.get("kind") == "prompts":
        out.append(f"- conditioning: {inputs['num_distinct']} distinct prompts, cycled.")
    else:
        out.append("- conditioning: none (unconditional).")
    out.append(f"- guidance convention: {info.get('guidance_convention')}.")
    out.append(f"- images: {info.get('images')}.")
    for name, desc in info.get("metrics", {}).items():
        out.append(f"- metric `{name}`: " + "; ".join(f"{k}: {_short(v)}" for k, v in _flat(desc).items()) + ".")
    if not info.get("metrics"):
        out.append("- no quality metric was computed (NFE, latency and memory only).")
    reference = info.get("teacher_reference")
    if reference:
        how = "read from the cache" if reference.get("cache_hit") else "sampled for this evaluation and cached"
        out.append(f"- teacher reference `{reference.get('model')}`: the teacher's samples on the same prompts and "
                   f"seeds, {how} ({reference.get('cache_file')}, sampled {reference.get('sampled')}).")  # fmt: skip
    check = info.get("diversity_check")
    if check:
        base, limit = check["reference"], check["min_ratio"]
        out.append(f"- diversity_ratio: a row's diversity over {base['model']} at {_steps_of(base['num_steps'])} "
                   f"steps ({_short(base.get('diversity'))}); students below {limit:g} are flagged.")  # fmt: skip
    if info.get("target"):
        out.append(
            "- target: "
            + "; ".join(
                f"{k}: {_short(v)}"
                for k, v in _flat(info["target"]).items()
                if not k.startswith("spec.") and k != "description"
            )
            + "."
        )
    out += ["", "| model | weights | guidance | scheduler / solver | source |", "| --- | --- | ---: | --- | --- |"]
    for name, m in info.get("models", {}).items():
        g = m.get("guidance_scale")
        out.append(f"| {name} | {m.get('weights', '–')} | {g if g is not None else '–'} "
                   f"| {m.get('scheduler', '–')} | {m.get('source', '–')} |")  # fmt: skip
    out += ["", "| model | steps | timesteps / levels |", "| --- | ---: | --- |"]
    for r in report.rows:
        sched = "; ".join(f"{k}: {_short(v)}" for k, v in r.schedule.items()) or "–"
        out.append(f"| {r.model} | {_steps(r)} | {sched} |")
    out += [
        "",
        f"- NFE: {info.get('nfe')}.",
        f"- latency: {info.get('latency')}.",
        f"- memory: {info.get('memory')}.",
        f"- fewstep {env.get('fewstep')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"torchmetrics {env.get('torchmetrics')}; device {env.get('device')} ({env.get('device_name')}, "
        f"{env.get('torch_threads')} torch threads); {env.get('date')}.",
    ]
    if info.get("overview_grid"):
        out.append(f"- samples: `{info['overview_grid']}` (one row per table row, in order); all images in `images/`.")
    return "\n".join(out) + "\n"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``feature_network.name``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any, max_items: int = 12) -> str:
    """A value for the markdown report: floats to 4 digits, long lists elided in the middle (eval.json has all)."""
    if isinstance(value, list):
        items = [_short(v) for v in value]
        if len(items) > max_items:
            items = [*items[: max_items - 3], "…", *items[-2:]]
        return "[" + ", ".join(items) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
