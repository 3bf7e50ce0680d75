"""Writing an evaluation: ``eval.json`` (every number and comparability field), ``eval.md`` (the table and the same
fields as a list), one sample grid per row (``grids/``) and the overview ``grid.png``, PNGs per image (``images/``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from fewstep.eval.harness import EvalReport, Row

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
GRID_FILE = "grid.png"


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


def write_row_images(row: Row, images: Tensor, out_dir: Path, name: str) -> None:
    """``images/<name>/00000.png ...`` (``images``: ``[n, c, h, w]`` uint8)."""
    from PIL import Image

    folder = out_dir / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        pixels = image.permute(1, 2, 0).numpy()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / f"{i:05d}.png")
    row.images_dir = str(folder.relative_to(out_dir))


def _write_grids(report: EvalReport, out_dir: Path) -> None:
    from fewstep.train.logging import save_sample_grid

    slugs = unique_slugs([r.model for r in report.rows])
    previews = [r.preview for r in report.rows if r.preview is not None and len(r.preview)]
    for row in report.rows:
        if row.preview is not None and len(row.preview):
            grid = save_sample_grid([row.preview], out_dir / "grids" / f"{slugs[row.model]}_{row.num_steps}steps.png")
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
        return "–"
    return format(value, spec) if math.isfinite(value) else str(value)


def format_table(report: EvalReport) -> str:
    """The rows as a markdown table: model, steps, NFE, each metric (arrow: better direction), ms / image, memory."""
    metrics = report.info.get("metrics", {})
    arrows = {name: "↑" if d.get("higher_is_better") else "↓" for name, d in metrics.items()}
    names = list(metrics) or sorted({k for r in report.rows for k in r.metrics})
    head = ["model", "steps", "NFE", *[f"{m} {arrows.get(m, '')}".strip() for m in names], "ms / image", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for r in report.rows:
        cells = [r.model, str(r.num_steps), _fmt(r.nfe_per_image, "g")]
        cells += [_fmt(r.metrics.get(m), ".4g") for m in names]
        cells += [_fmt(r.seconds_per_image * 1000, ".3g"), _fmt(r.peak_memory_mib, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_report(report: EvalReport) -> str:
    """``eval.md``: the table, then every field that makes its numbers comparable."""
    info = report.info
    env = info.get("environment", {})
    out = ["# Evaluation", "", format_table(report), "## How these numbers were made", ""]
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
        out.append(f"| {r.model} | {r.num_steps} | {sched} |")
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
