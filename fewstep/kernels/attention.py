"""``attention_jvp`` (dispatch: CUDA op or reference) and ``attention``, an SDPA with a forward-mode rule.

``attention(q, k, v, mask, scale)`` is ``torch.nn.functional.scaled_dot_product_attention`` as a
``torch.autograd.Function`` whose ``jvp`` computes the tangent with ``attention_jvp`` (the fused op when it is
built and the tensors are on a GPU; otherwise the tiled reference) and whose ``backward`` is the tiled
FlashAttention-2 backward. So ``torch.func.jvp`` and ``torch.autograd.forward_ad`` run through it without the
``L_q × L_k`` matrix, and ordinary training can still back-propagate through the primal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewstep.kernels import cuda
from fewstep.kernels.reference import attention_backward_reference, attention_jvp_reference, check_inputs


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(O, Ȯ)`` of ``softmax(κ·QKᵀ + M)·V`` along the tangents ``(dq, dk, dv)``, in one tiled pass.

    Args:
        q, k, v: ``[B, H, L_q, D]``, ``[B, H, L_k, D]``, ``[B, H, L_k, D_v]`` (any leading dims for the reference).
        dq, dk, dv: tangents of the same shapes.
        mask: boolean (True = attend) or additive, broadcastable to ``[B, H, L_q, L_k]``.
        scale: κ, default ``1/sqrt(D)``.
        backend: ``"auto"`` (the CUDA op when built and supported for these tensors, else the reference),
            ``"cuda"`` (the op, or an error saying why it cannot run) or ``"reference"``.
    """
    if backend not in ("auto", "cuda", "reference"):
        raise ValueError(f"backend {backend!r} is not one of auto, cuda, reference.")
    if backend != "reference":
        reason = cuda.unsupported_reason(q, k, v, mask)
        if reason is None:
            out, out_t, _ = cuda.attention_jvp_cuda(q, k, v, dq, dk, dv, mask, scale)
            return out, out_t
        if backend == "cuda":
            raise RuntimeError(f"The CUDA attention JVP cannot run here: {reason}")
    out, out_t, _ = attention_jvp_reference(q, k, v, dq, dk, dv, mask, scale)
    return out, out_t


def _primal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> tuple[Tensor, Tensor]:
    """``(O, lse)`` without tangents: the CUDA op where it runs, else the reference."""
    if cuda.unsupported_reason(q, k, v, mask) is None:
        out, _, lse = cuda.attention_jvp_cuda(q, k, v, None, None, None, mask, scale)
        return out, lse
    out, _, lse = attention_jvp_reference(q, k, v, mask=mask, scale=scale)
    return out, lse


class AttentionWithJVP(torch.autograd.Function):
    """SDPA with a forward-mode rule (``jvp``) and a backward; the mask and scale carry no derivative."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
        out, lse = _primal(q, k, v, mask, scale)
        return out, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, mask, scale = inputs
        out, lse = output
        ctx.scale = scale
        ctx.has_mask = mask is not None
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        ctx.save_for_forward(q, k, v, *([mask] if mask is not None else []))
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(True)

    @staticmethod
    def jvp(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, *_: Any) -> tuple[Tensor, None]:
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        dq = torch.zeros_like(q) if dq is None else dq
        dk = torch.zeros_like(k) if dk is None else dk
        dv = torch.zeros_like(v) if dv is None else dv
        _, out_t = attention_jvp(q, k, v, dq, dk, dv, mask, ctx.scale)
        return out_t, None

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        dq, dk, dv = attention_backward_reference(grad_out, q, k, v, out, lse, mask, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(κ·QKᵀ + M)·V`` that ``torch.func.jvp``, forward-mode AD and autograd all go through."""
    check_inputs(q, k, v, mask)
    out, _ = AttentionWithJVP.apply(q, k, v, mask, scale)
    return out
