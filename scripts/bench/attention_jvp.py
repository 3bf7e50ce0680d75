"""Attention forward + JVP: time and peak memory of four implementations, side by side in one run.

    python scripts/bench/attention_jvp.py                       # a GPU: bf16, L = 1k…16k, D = 64 and 128
    python scripts/bench/attention_jvp.py --device cpu --lengths 128,256 --dims 64 --batch-heads 4 --dtype float32

(a) PyTorch SDPA forward (the flash kernel on a GPU), (b) fewstep's fused forward + JVP (``backend="cuda"``; the
reference on a CPU), (c) ``torch.func.jvp`` through math SDPA (until it runs out of memory), (d) the tiled pure-PyTorch
reference. Achieved TFLOP/s count the six ``L_q × L_k × D`` matmuls of forward + JVP (QKᵀ, PV, Q̇Kᵀ, QK̇ᵀ, PV̇,
(P⊙Ṡ)V; two for (a)). Ratios are against (a) measured in the same run. Writes the ``attention_jvp`` section of
``docs/results.md`` and records in ``docs/results.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import fmt, hardware, merge_records, today, write_section  # noqa: E402

from fewstep.kernels import attention_jvp, attention_jvp_reference  # noqa: E402

METHODS = ("sdpa_forward", "fused_jvp", "func_jvp_math", "reference_jvp")


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float | None, float | None]:
    """Median seconds over ``repeats`` (after a warm-up) and peak memory in MiB (GPU only); ``(None, None)`` on OOM."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        return statistics.median(times), peak
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None


def bench_one(batch_heads: int, length: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int,
              math_limit: int) -> list[dict]:  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, batch_heads, length, dim)
    q, k, v, dq, dk, dv = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(6))
    with torch.no_grad():
        runs = {
            "sdpa_forward": lambda: F.scaled_dot_product_attention(q, k, v),
            "fused_jvp": lambda: attention_jvp(
                q, k, v, dq, dk, dv, backend="cuda" if device.type == "cuda" else "auto"
            ),
            "reference_jvp": lambda: attention_jvp_reference(q, k, v, dq, dk, dv),
        }
        if length <= math_limit:

            def math_jvp():
                with sdpa_kernel(SDPBackend.MATH):
                    return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))

            runs["func_jvp_math"] = math_jvp
        results = {name: measure(fn, device, repeats) for name, fn in runs.items()}
    base_time = results["sdpa_forward"][0]
    rows = []
    for name in METHODS:
        seconds, peak = results.get(name, (None, None))
        matmuls = 2 if name == "sdpa_forward" else 6
        flops = matmuls * 2 * batch_heads * length * length * dim
        rows.append({
            "benchmark": "attention_jvp", "method": name, "batch_heads": batch_heads, "length": length, "head_dim": dim,
            "dtype": str(dtype).removeprefix("torch."), "seconds": seconds, "peak_mib": peak,
            "tflops": flops / seconds / 1e12 if seconds else None,
            "ratio_to_sdpa_forward": seconds / base_time if seconds and base_time else None,
            "status": "ok" if seconds else ("skipped" if name not in results else "out of memory"),
            "hardware": hardware(device), "date": today(),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| L | D | method | ms | × SDPA fwd | TFLOP/s | peak MiB | status |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ms = r["seconds"] * 1e3 if r["seconds"] else None
        lines.append(
            f"| {r['length']} | {r['head_dim']} | {r['method']} | {fmt(ms, '.3f')} | "
            f"{fmt(r['ratio_to_sdpa_forward'], '.2f')} | {fmt(r['tflops'], '.1f')} | {fmt(r['peak_mib'], '.0f')} | "
            f"{r['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--batch-heads", type=int, default=64, help="B·H (enough to fill the GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--math-limit", type=int, default=16384, help="longest L tried for (c)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results.json")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            rows += bench_one(args.batch_heads, length, dim, dtype, device, args.repeats, args.math_limit)
            print(table([r for r in rows if r["length"] == length and r["head_dim"] == dim]), flush=True)
    body = (
        "## Attention JVP (`scripts/bench/attention_jvp.py`)\n\n"
        f"{hardware(device)}, {args.dtype}, B·H = {args.batch_heads}, measured {today()}. "
        "Forward + JVP against the SDPA forward of the same run; TFLOP/s over the six-matmul count.\n\n" + table(rows)
    )
    write_section(args.results, "attention_jvp", body)
    merge_records(args.json, rows, key=lambda r: (r.get("benchmark"), r.get("method"), r.get("length"),
                                                  r.get("head_dim"), r.get("dtype"), r.get("hardware")))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
