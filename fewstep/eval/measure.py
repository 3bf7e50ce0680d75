"""Measurements of the evaluation harness: network evaluations (NFE), peak memory, synchronisation, environment.

* ``NFECounter``: a forward pre-hook on the backbone counts the samples passing through it (a CFG step on a doubled
  batch counts 2 per image).
* ``PeakMemory``: ``torch.cuda.max_memory_allocated`` on a GPU (reset per row, so it includes resident weights); on a
  CPU the increase of the process's peak resident set over its value at the row's start (Linux: the peak is reset per
  row through ``/proc/self/clear_refs``; elsewhere ``resource.getrusage``'s lifetime peak, 0 when an earlier peak
  was higher).
* ``environment``: versions, device and date for the report.
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import re
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class NFECounter:
    """Counts the samples passing through ``network.forward`` while active (``with counter.counting():``)."""

    def __init__(self, network: nn.Module | None) -> None:
        self.network = network
        self.samples = 0

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next((v for k, v in kwargs.items() if k in ("sample", "hidden_states", "x")), None)
        if isinstance(x, Tensor):
            self.samples += int(x.shape[0])

    @contextlib.contextmanager
    def counting(self) -> Iterator[NFECounter]:
        handle = self.network.register_forward_pre_hook(self._hook, with_kwargs=True) if self.network else None
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


class PeakMemory:
    """Peak memory of one row on ``device`` (see the module docstring for what is measured where)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = self._kind()

    def _kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the row (reset per row; includes resident weights)"
        if _status_kib("VmHWM") is not None and self._reset_rss_peak():
            return "CPU: increase of the process peak RSS over the RSS at the row's start (VmHWM, reset per row)"
        return "CPU: increase of the process lifetime peak RSS (resource.getrusage; 0 if an earlier peak was higher)"

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.kind:
            self._reset_rss_peak()
            self._base_kib = _status_kib("VmRSS") or 0
        else:
            self._base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def stop_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_kib("VmHWM") if "VmHWM" in self.kind else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, (peak or 0) - self._base_kib) / 1024


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and date of this evaluation."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {
        "fewstep": ver("fewstep") or _fewstep_version(),
        "torch": torch.__version__,
        "diffusers": ver("diffusers"),
        "transformers": ver("transformers"),
        "torchmetrics": ver("torchmetrics"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def _fewstep_version() -> str:
    from fewstep import __version__

    return __version__
