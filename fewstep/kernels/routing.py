"""Route attention through ``fewstep.kernels.attention`` so ``torch.func.jvp`` runs through diffusers models.

Every attention processor that UNet2DConditionModel, SD3, Flux and Wan use ends in
``torch.nn.functional.scaled_dot_product_attention``: the classic processors call it directly, the newer ones
through diffusers' ``dispatch_attention_fn`` with its ``native`` backend. ``route_attention()`` is a
``TorchFunctionMode`` that catches exactly that call and answers it with ``attention`` (same math, plus a
forward-mode rule), so models run unchanged. While it is active, diffusers' attention backend is held at
``native`` (a flash/sage/xformers backend has no forward-mode rule and would bypass the route).

Where the fused CUDA op cannot run, no mask is given and the float32/64 score matrix is small (at most
``MATH_SCORES`` elements, e.g. every attention of a small UNet on a CPU), the route answers with PyTorch's own math
attention instead: it has a forward-mode rule too, the full score matrix costs little there, and it avoids the
tiled reference's per-call overhead. Long sequences always take ``attention`` (memory ``O(L·chunk)``).

The same mode also makes ``group_norm``'s input contiguous: torch 2.13's forward-mode formula for it fails on
non-contiguous input (diffusers' UNet2DModel attention blocks give it such input; fixed in torch 2.14.1).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fewstep.kernels import cuda
from fewstep.kernels.attention import attention

_SDPA = F.scaled_dot_product_attention
_MATH_SDPA = torch.ops.aten._scaled_dot_product_attention_math
MATH_SCORES = 1 << 22  # B·H·L_q·L_k up to which PyTorch's math attention answers when the CUDA op cannot run


def _sdpa_args(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return tuple(bound.get(n) for n in names)


def _causal_mask(len_q: int, len_k: int, device: torch.device) -> torch.Tensor:
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(diagonal=len_k - len_q)


def _small(q: torch.Tensor, k: torch.Tensor) -> bool:
    """A float32/64 score matrix of at most ``MATH_SCORES`` elements."""
    return q.dtype in (torch.float32, torch.float64) and q.numel() // q.shape[-1] * k.shape[-2] <= MATH_SCORES


class _RouteSDPA(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.group_norm:
            if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
                args = (args[0].contiguous(), *args[1:])
            return func(*args, **kwargs)
        if func is not _SDPA:
            return func(*args, **kwargs)
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(args, kwargs)
        if dropout_p:
            raise ValueError("route_attention: attention dropout is not supported under the JVP route (use eval()).")
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # grouped-query attention: repeat the key/value heads
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        if is_causal:
            causal = _causal_mask(q.shape[-2], k.shape[-2], q.device)
            mask = (
                causal
                if mask is None
                else (mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf")))
            )
        if mask is None and _small(q, k) and cuda.unsupported_reason(q, k, v, mask) is not None:
            return _MATH_SDPA(q, k, v, scale=scale)[0]
        return attention(q, k, v, mask, scale)


_ATTENTION_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Module]] = weakref.WeakKeyDictionary()


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that hold an attention ``processor``, found once per model (a walk over a large
    backbone on every JVP costs milliseconds); their processors are read afresh on each call."""
    if model not in _ATTENTION_MODULES:
        _ATTENTION_MODULES[model] = [m for m in model.modules() if hasattr(m, "processor")]
    return _ATTENTION_MODULES[model]


def _pinned_processors(models: tuple[torch.nn.Module, ...]) -> list[tuple[Any, Any]]:
    """Attention processors with their own backend (``model.set_attention_backend(...)``): they would bypass the
    route, so ``route_attention`` clears the setting for the block and restores it afterwards."""
    pinned = []
    for model in models:
        for module in _attention_modules(model):
            processor = getattr(module, "processor", None)
            if getattr(processor, "_attention_backend", None) is not None:
                pinned.append((processor, processor._attention_backend))
    return pinned


@contextlib.contextmanager
def route_attention(*models: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` (and every diffusers attention processor) runs through
    ``fewstep.kernels.attention``: ``torch.func.jvp`` works and attention memory stays ``O(L·chunk)``.

    Args:
        models: models whose processors may have been pinned to another backend with ``set_attention_backend``;
            they use the native (routed) path inside the block.

    Example:
        >>> with route_attention(), torch.no_grad():
        ...     out, tangent = torch.func.jvp(lambda x: unet(x, t, text).sample, (x,), (dx,))
    """
    pinned = _pinned_processors(models)
    for processor, _ in pinned:
        processor._attention_backend = None
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [setattr(p, "_attention_backend", b) for p, b in pinned])
        try:
            from diffusers.models.attention_dispatch import attention_backend
        except ImportError:  # an older diffusers without the dispatcher: processors call SDPA directly
            attention_backend = None
        if attention_backend is not None:
            stack.enter_context(attention_backend("native"))
        stack.enter_context(_RouteSDPA())
        yield
