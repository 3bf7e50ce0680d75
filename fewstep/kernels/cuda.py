"""Building, loading and calling the fused CUDA attention JVP in ``csrc/``.

The CPU install never compiles anything. On a machine with a CUDA GPU and a CUDA build of torch, the op is built
on first use with ``torch.utils.cpp_extension.load`` (cached in ``TORCH_EXTENSIONS_DIR``; ~2 minutes once), or
ahead of time with ``python -m fewstep.kernels.build``. ``FEWSTEP_ATTENTION_JVP=reference`` turns the op off.
A failed build is reported once and the reference implementation is used from then on.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

EXTENSION_NAME = "fewstep_attention_jvp"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOURCES = ("attention_jvp.cu", "attention_jvp_binding.cpp")


def csrc_dir() -> Path:
    """The kernel sources: ``$FEWSTEP_CSRC`` or the ``csrc/`` folder of the source checkout."""
    env = os.environ.get("FEWSTEP_CSRC")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "csrc"


@lru_cache(maxsize=1)
def _build_failure() -> list[str]:
    return []  # one entry once a build failed: never retried in this process


def build_reason() -> str | None:
    """Why the op cannot be built here (``None``: it can)."""
    if os.environ.get("FEWSTEP_ATTENTION_JVP", "").lower() == "reference":
        return "FEWSTEP_ATTENTION_JVP=reference"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    missing = [s for s in SOURCES if not (csrc_dir() / s).is_file()]
    if missing:
        return f"kernel sources {missing} not found in {csrc_dir()} (set FEWSTEP_CSRC to the csrc/ folder)"
    if _build_failure():
        return f"the build failed earlier: {_build_failure()[0]}"
    return None


@lru_cache(maxsize=1)
def load_extension(verbose: bool = False) -> Any:
    """Compile (first time) and import the extension. Raises ``RuntimeError`` with the reason if it cannot."""
    reason = build_reason()
    if reason is not None:
        raise RuntimeError(f"The fused attention JVP cannot be built: {reason}.")
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    try:
        return load(
            name=EXTENSION_NAME,
            sources=[str(src / s) for s in SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-std=c++20"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            verbose=verbose,
        )
    except Exception as err:  # compiler missing, wrong arch, ...: fall back to the reference for this process
        _build_failure().append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        logger.warning("Building the fused attention JVP failed (%s); using the PyTorch reference.", err)
        raise RuntimeError(f"The fused attention JVP failed to build: {err}") from err


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> str | None:
    """Why the CUDA op cannot take these tensors (``None``: it can, building it if needed)."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "the op takes [B, H, L, D] tensors"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (supported: float32, float16, bfloat16, the same for q, k, v)"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dims q {q.shape[-1]}, v {v.shape[-1]} (supported: {HEAD_DIMS}, equal)"
    if mask is not None and mask.ndim > 4:
        return "mask with more than 4 dims"
    reason = build_reason()
    if reason is not None:
        return reason
    try:
        load_extension()
    except RuntimeError as err:
        return str(err)
    return None


def attention_jvp_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(O, Ȯ or None, lse)`` from the fused op (see ``fewstep.kernels.reference`` for the definition)."""
    ext = load_extension()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        out, out_t, lse = ext.attention_jvp(q, k, v, dq, dk, dv, mask, scale, stream)
    return out, (out_t if dq is not None else None), lse
