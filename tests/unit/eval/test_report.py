"""``fewstep.eval.report``: JSON conversion, file-name slugs, the markdown table and report, the written files
(``eval.json``, ``eval.md``, per-row grids, the overview grid) and per-image PNGs.

The report functions read rows and the report by attribute; the small dataclasses below carry exactly those
attributes, so this file depends on ``fewstep.eval.report`` alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewstep.eval.report import (
    GRID_FILE,
    JSON_FILE,
    MARKDOWN_FILE,
    format_report,
    format_table,
    jsonable,
    slug,
    unique_slugs,
    write_report,
    write_row_images,
)


@dataclass
class Row:
    model: str
    num_steps: int
    num_images: int
    nfe_per_image: float | None
    seconds_per_image: float
    peak_memory_mib: float
    metrics: dict[str, float]
    schedule: dict[str, Any] = field(default_factory=dict)
    images_dir: str | None = None
    grid: str | None = None
    preview: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Report:
    rows: list[Row]
    info: dict[str, Any]
    out_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "rows": [{k: v for k, v in asdict(r).items() if k != "preview"} for r in self.rows]}


def make_report(previews: bool = False) -> Report:
    gray = torch.linspace(0, 1, 3 * 64).reshape(3, 1, 8, 8)
    rgb = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = [
        Row("teacher (DDIM, w=2)", 50, 8, 100.0, 0.0123, 12.34, {"fid": 12.3456, "accuracy": 0.9},
            schedule={"timesteps": list(range(999, 0, -50))}, preview=gray if previews else None),
        Row("student (lcm, ema)", 1, 8, 1.0, 0.0005, 3.0, {"fid": float("nan")}, schedule={"levels": [1.0]},
            preview=rgb if previews else None),
        Row("student (lcm, ema)", 4, 8, None, 0.002, 3.0, {}),
    ]  # fmt: skip
    info = {
        "num_samples": 8,
        "seed": 0,
        "batch_size": 4,
        "noise": "torch.randn, CPU generator",
        "inputs": {"kind": "class labels", "per_class": [1] * 10},
        "guidance_convention": "Imagen w (1 = off)",
        "images": "[0, 1] RGB",
        "metrics": {
            "fid": {"higher_is_better": False, "feature_network": {"name": "classifier", "dim": 64}},
            "accuracy": {"higher_is_better": True},
        },
        "target": {"kind": "teacher", "description": "skipped", "spec.scheduler": "skipped", "steps": [50]},
        "models": {"teacher (DDIM, w=2)": {"weights": "teacher", "guidance_scale": 2.0, "source": "fewstep:digits-vp"}},
        "nfe": "network evaluations per image",
        "latency": "wall time / image",
        "memory": "peak allocated",
        "environment": {"fewstep": "0.1", "torch": "2.x", "device": "cpu", "torch_threads": 1, "date": "today"},
    }
    return Report(rows, info)


def test_jsonable_converts_tensors_paths_and_non_finite_floats():
    value = {
        1: torch.tensor([[1.0, 2.0]]),
        "path": Path("/a/b"),
        "nums": (1, 2.5, float("inf"), float("nan")),
        "flags": [True, None],
        "obj": torch.float32,
    }
    out = jsonable(value)
    assert out == {"1": [[1.0, 2.0]], "path": "/a/b", "nums": [1, 2.5, "inf", "nan"], "flags": [True, None],
                   "obj": "torch.float32"}  # fmt: skip
    json.dumps(out, allow_nan=False)  # strictly valid JSON


def test_slugs_are_file_name_safe_and_unique():
    assert slug("teacher (DDIM, w=2)") == "teacher_ddim_w_2"
    assert slug("student v1.5 / EMA") == "student_v1.5_ema"
    assert slug("(!)") == "model"
    slugs = unique_slugs(["A b", "a-b", "A b", "a_b", "x"])
    assert slugs == {"A b": "a_b", "a-b": "a_b_2", "a_b": "a_b_3", "x": "x"}


def test_table_has_one_line_per_row_with_arrows_and_formatted_numbers():
    table = format_table(make_report())
    lines = table.splitlines()
    assert lines[0] == "| model | steps | NFE | fid ↓ | accuracy ↑ | ms / image | peak MiB |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert lines[2] == "| teacher (DDIM, w=2) | 50 | 100 | 12.35 | 0.9 | 12.3 | 12.3 |"
    assert lines[3] == "| student (lcm, ema) | 1 | 1 | nan | – | 0.5 | 3.0 |"
    assert lines[4] == "| student (lcm, ema) | 4 | – | – | – | 2 | 3.0 |"
    assert len(lines) == 5 and table.endswith("\n")


def test_table_without_metric_descriptions_lists_the_rows_metrics_sorted():
    report = make_report()
    del report.info["metrics"]
    assert format_table(report).splitlines()[0] == "| model | steps | NFE | accuracy | fid | ms / image | peak MiB |"


def test_markdown_report_states_how_the_numbers_were_made():
    report = make_report()
    text = format_report(report)
    assert text.startswith("# Evaluation\n\n" + format_table(report))
    assert "- 8 images per row; seed 0; batch size 4." in text
    assert "- conditioning: class labels 0..9 cycled (per class: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1])." in text
    assert "- metric `fid`: higher_is_better: False; feature_network.name: classifier; feature_network.dim: 64." in text
    assert "- target: kind: teacher; steps: [50]." in text  # description and spec.* left out
    assert "| teacher (DDIM, w=2) | teacher | 2.0 | – | fewstep:digits-vp |" in text
    # 20 timesteps: the first 9, an ellipsis, the last 2 (eval.json has them all)
    assert "| teacher (DDIM, w=2) | 50 | timesteps: [999, 949, 899, 849, 799, 749, 699, 649, 599, …, 99, 49] |" in text
    assert "| student (lcm, ema) | 4 | – |" in text
    assert (
        "fewstep 0.1, torch 2.x, diffusers None, torchmetrics None; device cpu (None, 1 torch threads); today." in text
    )
    assert "overview_grid" not in text and "- samples:" not in text

    report.info["inputs"] = {"kind": "prompts", "num_distinct": 3}
    report.info["metrics"] = {}
    text = format_report(report)
    assert "- conditioning: 3 distinct prompts, cycled." in text
    assert "- no quality metric was computed (NFE, latency and memory only)." in text
    report.info["inputs"] = {}
    assert "- conditioning: none (unconditional)." in format_report(report)


def test_write_report_writes_json_markdown_and_grids(tmp_path):
    report = make_report(previews=True)
    json_path, md_path = write_report(report, tmp_path / "eval")
    out = tmp_path / "eval"
    assert (json_path, md_path) == (out / JSON_FILE, out / MARKDOWN_FILE) and report.out_dir == out

    # one grid per row with a preview, named by slug and steps; the overview has one row per previewed row
    assert report.rows[0].grid == "grids/teacher_ddim_w_2_50steps.png"
    assert report.rows[1].grid == "grids/student_lcm_ema_1steps.png" and report.rows[2].grid is None
    first = Image.open(out / report.rows[0].grid)
    assert first.mode == "L" and first.size == (3 * 8 * 8, 8 * 8)  # 8×8 tiles enlarged 8× (≥ 64 px)
    overview = Image.open(out / GRID_FILE)
    # rows made alike: the fewest tiles (3), the largest size (16, nearest), RGB; 16 px tiles enlarged 4×
    assert overview.mode == "RGB" and overview.size == (3 * 16 * 4, 2 * 16 * 4)
    top_left = np.asarray(overview)[0, 0]
    assert (top_left == 0).all()  # the gray row's first pixel (0.0), repeated over the channels
    assert report.info["overview_grid"] == GRID_FILE

    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["rows"][0]["grid"] == report.rows[0].grid and "preview" not in data["rows"][0]
    assert (
        data["rows"][1]["metrics"]["fid"] != data["rows"][1]["metrics"]["fid"]
    )  # NaN is written as JSON's non-standard NaN
    assert data["overview_grid"] == GRID_FILE and data["num_samples"] == 8
    assert md_path.read_text(encoding="utf-8") == format_report(report)
    assert f"- samples: `{GRID_FILE}` (one row per table row, in order)" in md_path.read_text(encoding="utf-8")


def test_write_report_without_grids(tmp_path):
    report = make_report(previews=True)
    write_report(report, tmp_path, save_grid=False)
    assert not (tmp_path / GRID_FILE).exists() and not (tmp_path / "grids").exists()
    assert all(r.grid is None for r in report.rows) and "overview_grid" not in report.info


def test_row_images_are_one_png_per_image_with_exact_pixels(tmp_path):
    row = make_report().rows[0]
    gray = torch.randint(0, 256, (2, 1, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    write_row_images(row, gray, tmp_path, "teacher_ddim_w_2_50steps")
    assert row.images_dir == "images/teacher_ddim_w_2_50steps"
    files = sorted((tmp_path / row.images_dir).iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert Image.open(files[1]).mode == "L"
    assert np.array_equal(np.asarray(Image.open(files[1])), gray[1, 0].numpy())

    rgb = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    write_row_images(row, rgb, tmp_path, "rgb")
    pixels = np.asarray(Image.open(tmp_path / "images" / "rgb" / "00000.png"))
    assert pixels.shape == (4, 4, 3) and np.array_equal(pixels, rgb[0].permute(1, 2, 0).numpy())
