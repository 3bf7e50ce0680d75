"""Exact, device-free tensor memory on a CPU: what the planner's coefficients are measured with and what its
predictions are checked against.

``LiveTensorBytes`` is the CPU analogue of ``torch.cuda.max_memory_allocated``: a ``TorchDispatchMode`` that sees
every tensor an operation creates, counts each new storage once until it is freed (a weak reference on the storage),
and keeps the peak. Storages alive before the mode starts are not counted; ``tensor_bytes_alive`` adds them up
(every distinct CPU storage the garbage collector can reach). Unlike the process's resident set size it counts no
allocator slack, library code or Python objects, so predicted and measured bytes can be compared to the percent.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages() -> dict[int, Any]:
    """``{data pointer: storage}`` of every CPU tensor storage reachable by the garbage collector."""
    found: dict[int, Any] = {}
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on lazily deprecated module attributes warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                try:
                    storage = obj.untyped_storage()
                except (RuntimeError, NotImplementedError):  # wrapper subclasses without storage
                    continue
                found[storage.data_ptr()] = storage
    return found


def tensor_bytes_alive() -> int:
    """Bytes of every distinct CPU tensor storage alive now (parameters, optimizer state, data, caches)."""
    return sum(storage.nbytes() for storage in _storages().values())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of CPU tensor storages created inside the mode and still alive (``current``), and their peak.

    Example:
        >>> with LiveTensorBytes() as live:
        ...     loss = model(x).mean(); loss.backward()
        >>> live.peak  # bytes above what was alive before the block

    Args:
        exclude: data pointers of storages that existed before (default: every storage alive now), so an in-place
            update of a parameter is not taken for a new allocation.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        super().__init__()
        self._before: set[int] = set()
        if exclude is None:  # a storage freed inside the block gives its address back: forget it then
            for key, storage in _storages().items():
                self._before.add(key)
                weakref.finalize(storage, self._before.discard, key)
        else:
            self._before = set(exclude)
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a wrapper without storage of its own (torch.func's)
                continue
            if size == 0 or key in self._live or key in self._before:
                continue
            self._live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out
