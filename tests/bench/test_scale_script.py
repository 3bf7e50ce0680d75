"""scripts/bench/scale.py end to end on the smallest settings: the digits full-student run trains 2 steps on two CPU
processes as DDP and as FSDP2 full shard (a checkpoint after each step), the data-loading benchmark reads 8 images
as an image folder and as WebDataset shards, and the ``scale`` section and its records are written into a temporary
results.md / results.json, keeping what other benchmark scripts wrote there."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_script_writes_its_section_and_records(tmp_path):
    scale = load_script()
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    md.write_text("# Results\n\n<!-- quality:start -->\nkept\n<!-- quality:end -->\n")
    js.write_text(json.dumps({"rows": [{"benchmark": "quality", "name": "kept"}]}))
    scale.main([
        "--runs", "digits full, diffusion", "--sharded", "FSDP2 full shard", "--steps", "1", "--warmup", "1",
        "--batch-size", "2", "--images", "8", "--image-size", "32", "--resolution", "16", "--loader-batch", "4",
        "--rounds", "1", "--work-dir", str(tmp_path / "work"), "--results-md", str(md), "--results-json", str(js),
    ])  # fmt: skip

    text = md.read_text()
    assert "<!-- quality:start -->\nkept\n<!-- quality:end -->" in text
    section = text.split("<!-- scale:start -->")[1].split("<!-- scale:end -->")[0]
    assert "| digits full, diffusion | FSDP2 full shard |" in section
    assert "| webdataset shards | VAE |" in section

    rows = json.loads(js.read_text())["rows"]
    assert {"benchmark": "quality", "name": "kept"} in rows
    layouts = {r["layout"]: r for r in rows if r.get("benchmark") == "scale" and r["kind"] == "layout"}
    assert sorted(layouts) == ["DDP", "FSDP2 full shard"]
    ddp, fsdp = layouts["DDP"], layouts["FSDP2 full shard"]
    assert ddp["steps_timed"] == fsdp["steps_timed"] == 1 and fsdp["step_s"] > 0 and ddp["save_s"] > 0
    assert all(abs(ratio - 0.5) < 0.01 for ratio in fsdp["static_vs_ddp"].values())  # full shard halves each part
    assert sorted(fsdp["static_vs_ddp"]) == sorted(scale.PARTS)
    for row in layouts.values():
        assert row["checkpoint_bytes"] > sum(row["state_bytes_rank0"][p] for p in ("trainable_weights", "ema"))
        assert row["load_s"] > 0 and len(row["state_bytes_per_rank"]) == 2
    loaders = {(r["source"], r["mode"]): r for r in rows if r.get("benchmark") == "scale" and r["kind"] == "loader"}
    assert set(loaders) == {
        ("image folder", "VAE"), ("image folder", "cached latents"), ("image folder", "decode only"),
        ("webdataset shards", "VAE"), ("webdataset shards", "decode only"),
    }  # fmt: skip
    assert all(r["samples_per_s"] > 0 for r in loaders.values())
    assert loaders[("image folder", "VAE")]["vs_folder"] == 1.0
