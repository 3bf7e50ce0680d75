"""Shared by the benchmark scripts: the hardware string, ``docs/results.md`` sections and ``docs/results.json`` records.

``docs/results.md`` holds one marked section per benchmark script (``<!-- quality:start -->`` … ``<!-- quality:end
-->``); a script rewrites only its own section and keeps everything else. ``docs/results.json`` is
``{"rows": [record, ...]}``: every record has a ``benchmark`` field and a key (``record_key``); a script's new records
replace old ones with the same key and keep all others.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_HEADER = (
    "# Results\n\n"
    "Numbers measured by the benchmark scripts in `scripts/bench/`. Each section below is rewritten by the script\n"
    "named in it (between its `<!-- name:start -->` and `<!-- name:end -->` markers); the same rows are in\n"
    "`docs/results.json`, one record per row.\n"
)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device | str) -> str:
    """Where numbers were measured: ``"GPU: <name>"`` or ``"CPU: <model> (<n> cores, <t> torch threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def today() -> str:
    """The UTC date, ``YYYY-MM-DD``."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def write_section(path: Path, name: str, body: str) -> Path:
    """Replace the ``name`` section of the markdown file ``path`` with ``body`` (appended if absent; the file is
    created with a short header if missing). Other sections and text are kept byte for byte."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else RESULTS_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``docs/results.json`` (empty if the file does not exist)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a results file: expected an object with a 'rows' list.")
    return rows


def merge_records(
    path: Path, new: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]
) -> list[dict[str, Any]]:
    """Write ``new`` into ``path``: old records with the same ``key`` are replaced, all others kept (in order).

    Returns:
        Every record of the file after the merge.
    """
    fresh = {key(r) for r in new}
    rows = [r for r in read_records(path) if key(r) not in fresh] + list(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return rows


def update_records(
    path: Path, updates: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], tuple]
) -> list[dict[str, Any]]:
    """Replace the records of ``path`` that have an update's ``key`` in place (the file's order is kept); updates
    without a record in the file are dropped.

    Returns:
        Every record of the file after the update.
    """
    by_key = {key(r): r for r in updates}
    rows = [by_key.get(key(r), r) for r in read_records(path)]
    path.write_text(json.dumps({"rows": rows}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return rows


def fmt(value: float | None, spec: str) -> str:
    """A table cell: ``–`` for missing values."""
    return "–" if value is None else format(value, spec)
