"""The video benchmark script end to end on a 2-step student: rows for the real clips, the teacher and the student,
with every per-frame and temporal column, into results.md and results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import video_quality  # noqa: E402


def test_video_benchmark_writes_rows(tmp_path):
    torch.set_num_threads(1)
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    argv = [
        "--recipes", "moving_digits_dmd2", "--max-steps", "2", "--num-clips", "12", "--teacher-steps", "1,2",
        "--student-steps", "1", "--batch-size", "12", "--runs-dir", str(tmp_path / "runs"),
        "--out-dir", str(tmp_path / "eval"), "--results-md", str(md), "--results-json", str(js),
        "--set", "train.sample_every=100", "--set", "train.checkpoint_every=2", "--device", "cpu",
    ]  # fmt: skip
    assert video_quality.main(argv) == 0
    rows = [r for r in json.loads(js.read_text())["rows"] if r["benchmark"] == "video_quality"]
    kinds = sorted((r["kind"], r["steps"]) for r in rows)
    assert kinds == [("data", None), ("student", 1), ("teacher", 1), ("teacher", 2)]
    for r in rows:
        assert set(r["metrics"]) == {k for k, _, _ in video_quality.COLUMNS}
        assert r["num_clips"] == 12
    data = next(r for r in rows if r["kind"] == "data")["metrics"]
    assert data["frame_accuracy"] > 0.9 and data["teleports"] == 0
    student = next(r for r in rows if r["kind"] == "student")
    assert student["objective"] == "dmd2" and student["training_steps"] == 2 and student["nfe"] == 1
    text = md.read_text()
    assert "<!-- video_quality:start -->" in text and "dmd2 (`moving_digits_dmd2`)" in text
    assert (tmp_path / "eval" / "filmstrips").is_dir()
