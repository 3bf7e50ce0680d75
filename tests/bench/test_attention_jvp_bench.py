"""scripts/bench/attention_jvp.py runs end to end (tiny sizes on a CPU) and writes its section and records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "attention_jvp.py"


def test_attention_jvp_benchmark_writes_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("attention_jvp_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    md.write_text("# Results\n\nkept text\n")
    args = ["--device", "cpu", "--lengths", "64,96", "--dims", "64", "--batch-heads", "2", "--dtype", "float32",
            "--repeats", "1", "--math-limit", "64", "--results", str(md), "--json", str(js)]  # fmt: skip
    assert module.main(args) == 0
    text = md.read_text()
    assert "kept text" in text and "<!-- attention_jvp:start -->" in text and "| 96 | 64 | fused_jvp |" in text
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 8 and {r["method"] for r in rows} == set(module.METHODS)
    math_96 = next(r for r in rows if r["method"] == "func_jvp_math" and r["length"] == 96)
    assert math_96["status"] == "skipped" and math_96["seconds"] is None  # beyond --math-limit
    fused = [r for r in rows if r["method"] == "fused_jvp"]
    assert all(r["seconds"] > 0 and r["tflops"] > 0 and r["ratio_to_sdpa_forward"] > 0 for r in fused)
