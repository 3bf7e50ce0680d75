"""The attention backend of ordinary (non-JVP) forwards: PyTorch SDPA by default, xformers where it is installed on
a GPU. The JVP route (``route_attention``) always uses fewstep's own op whatever is chosen here."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

FORWARD_BACKENDS = ("sdpa", "xformers")


def xformers_unavailable_reason() -> str | None:
    """Why xformers cannot be used here (``None``: it can)."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'fewstep[xformers]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "xformers needs a CUDA GPU"
    return None


def set_forward_attention(model: nn.Module, backend: str = "sdpa") -> None:
    """Use ``backend`` for the ordinary attention forward of a diffusers model.

    Args:
        model: a diffusers ``ModelMixin`` (UNet or transformer).
        backend: ``"sdpa"`` (PyTorch's scaled_dot_product_attention, the default) or ``"xformers"``.
    """
    if backend not in FORWARD_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(FORWARD_BACKENDS)}.")
    if backend == "xformers":
        reason = xformers_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Cannot use xformers attention: {reason}. Use backend='sdpa'.")
        model.enable_xformers_memory_efficient_attention()
    elif hasattr(model, "disable_xformers_memory_efficient_attention"):
        model.disable_xformers_memory_efficient_attention()
