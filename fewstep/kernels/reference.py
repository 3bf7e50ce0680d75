"""The pure-PyTorch attention JVP: the source of truth for the CUDA op.

``O = softmax(κ·QKᵀ + M)·V`` and its directional derivative along ``(Q̇, K̇, V̇)``:

    Ṡ = κ(Q̇Kᵀ + QK̇ᵀ);   Ȯ = P·V̇ + (P⊙Ṡ)·V − diag(rowsum(P⊙Ṡ))·O

computed the way the kernel computes it: tiles of keys visited once with an online softmax (running max ``m`` and
normaliser ``ℓ``) and three accumulators per query row, ``A = Σ e^{S−m}·V``, ``T = Σ e^{S−m}·(V̇ + Ṡ·V)`` and
``r = Σ e^{S−m}·Ṡ``; at the end ``O = A/ℓ`` and ``Ȯ = T/ℓ − (r/ℓ)·O``. Memory is ``O(q_chunk·k_chunk)`` per
(batch, head), never ``L_q × L_k``. Everything accumulates in float32 (float64 inputs in float64); outputs are
cast back to the input dtype.

Layout is PyTorch SDPA's: ``[..., L, D]`` (usually ``[B, H, L, D]``). The mask follows SDPA too: boolean
(``True`` = attend) or additive float, broadcastable to ``[..., L_q, L_k]``; it carries no tangent. A query row with
every key masked gives ``O = 0`` and ``Ȯ = 0`` (and ``lse = −inf``), never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64 (for gradcheck-grade tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mask_chunk(mask: Tensor | None, qs: slice, ks: slice) -> Tensor | None:
    """The ``[..., q, k]`` block of a broadcastable mask (size-1 dims stay size 1)."""
    if mask is None:
        return None
    q_dim = qs if mask.shape[-2] != 1 else slice(None)
    k_dim = ks if mask.shape[-1] != 1 else slice(None)
    return mask[..., q_dim, k_dim]


def _scores(q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``κ·QKᵀ + M`` in float32, ``−inf`` where a boolean mask is False."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + mask.to(s.dtype)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """Shapes: q [..., L_q, D], k [..., L_k, D], v [..., L_k, D_v]; the mask broadcasts to [..., L_q, L_k]."""
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v need the same rank >= 2; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"Attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] with the same leading dims)."
        )
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (*q.shape[:-2], q.shape[-2], k.shape[-2]))
        except RuntimeError as err:
            raise ValueError(
                f"attn_mask {tuple(mask.shape)} does not broadcast to [..., Lq, Lk] = "
                f"{(*q.shape[:-2], q.shape[-2], k.shape[-2])}."
            ) from err


def attention_jvp_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    q_chunk: int = DEFAULT_CHUNK,
    k_chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Attention output, its tangent and the log-sum-exp, tile by tile.

    Args:
        q, k, v: ``[..., L_q, D]``, ``[..., L_k, D]``, ``[..., L_k, D_v]``.
        dq, dk, dv: their tangents (same shapes); all ``None`` computes the primal only. A single ``None`` among
            them is a zero tangent.
        mask: boolean (True = attend) or additive, broadcastable to ``[..., L_q, L_k]``.
        scale: κ; default ``1/sqrt(D)``.
        q_chunk, k_chunk: tile sizes (memory per tile ``q_chunk × k_chunk`` per leading index).

    Returns:
        ``(O [..., L_q, D_v], Ȯ or None, lse [..., L_q] float32)``.
    """
    check_inputs(q, k, v, mask)
    with_tangent = not (dq is None and dk is None and dv is None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out_dtype, acc = q.dtype, _accumulation_dtype(q)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if with_tangent:
        dq = torch.zeros_like(q) if dq is None else dq.to(acc)
        dk = torch.zeros_like(k) if dk is None else dk.to(acc)
        dv = torch.zeros_like(v) if dv is None else dv.to(acc)
    lead, len_q, len_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    out = q.new_empty(*lead, len_q, v.shape[-1])
    out_t = torch.empty_like(out) if with_tangent else None
    lse = q.new_empty(*lead, len_q)
    for q0 in range(0, len_q, q_chunk):
        qs = slice(q0, min(q0 + q_chunk, len_q))
        qc = q[..., qs, :]
        m = qc.new_full((*lead, qc.shape[-2], 1), float("-inf"))  # running row max
        ell = qc.new_zeros((*lead, qc.shape[-2], 1))  # running normaliser
        acc = qc.new_zeros((*lead, qc.shape[-2], v.shape[-1]))  # A = Σ p·V
        acc_t = torch.zeros_like(acc) if with_tangent else None  # T = Σ p·(V̇ + Ṡ·V)
        r = torch.zeros_like(ell) if with_tangent else None  # r = Σ p·Ṡ
        for k0 in range(0, len_k, k_chunk):
            ks = slice(k0, min(k0 + k_chunk, len_k))
            kc, vc = k[..., ks, :], v[..., ks, :]
            s = _scores(qc, kc, scale, _mask_chunk(mask, qs, ks))  # [..., q, k]
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all-masked so far → 0
            alpha = torch.exp(m - m_safe)  # rescales the old accumulators (0 when m was −inf)
            p = torch.exp(s - m_safe)  # [..., q, k]; exactly 0 where masked
            ell = ell * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + torch.matmul(p, vc)
            if with_tangent:
                s_t = (
                    torch.matmul(dq[..., qs, :], kc.transpose(-1, -2))
                    + torch.matmul(qc, dk[..., ks, :].transpose(-1, -2))
                ) * scale
                ps_t = p * s_t  # P⊙Ṡ (0 where masked)
                acc_t = acc_t * alpha + torch.matmul(p, dv[..., ks, :]) + torch.matmul(ps_t, vc)
                r = r * alpha + ps_t.sum(-1, keepdim=True)
            m = m_new
        empty = ell == 0  # rows with every key masked
        ell_safe = torch.where(empty, torch.ones_like(ell), ell)
        o = acc / ell_safe
        out[..., qs, :] = o
        if with_tangent:
            out_t[..., qs, :] = acc_t / ell_safe - (r / ell_safe) * o  # Ȯ = T/ℓ − (r/ℓ)·O
        m_fin = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        lse[..., qs] = torch.where(empty, torch.full_like(ell, float("-inf")), m_fin + torch.log(ell_safe)).squeeze(-1)
    return out.to(out_dtype), out_t.to(out_dtype) if out_t is not None else None, lse


def attention_backward_reference(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    q_chunk: int = DEFAULT_CHUNK,
    k_chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the primal attention w.r.t. ``q, k, v`` from the saved ``out`` and ``lse`` (FlashAttention-2's
    backward, tiled): ``P = e^{S − lse}``, ``dV = Pᵀ·dO``, ``dS = P⊙(dO·Vᵀ − rowsum(dO⊙O))``, ``dQ = κ·dS·K``,
    ``dK = κ·dSᵀ·Q``. Returns ``(dq, dk, dv)`` in the inputs' dtypes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtypes, acc = (q.dtype, k.dtype, v.dtype), _accumulation_dtype(q)
    q, k, v, out, grad_out = q.to(acc), k.to(acc), v.to(acc), out.to(acc), grad_out.to(acc)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO⊙O) [..., L_q, 1]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1)
    len_q, len_k = q.shape[-2], k.shape[-2]
    for q0 in range(0, len_q, q_chunk):
        qs = slice(q0, min(q0 + q_chunk, len_q))
        qc, go = q[..., qs, :], grad_out[..., qs, :]
        for k0 in range(0, len_k, k_chunk):
            ks = slice(k0, min(k0 + k_chunk, len_k))
            kc, vc = k[..., ks, :], v[..., ks, :]
            p = torch.exp(_scores(qc, kc, scale, _mask_chunk(mask, qs, ks)) - lse_safe[..., qs, :])
            p = torch.where(torch.isinf(lse[..., qs]).unsqueeze(-1), torch.zeros_like(p), p)
            dv[..., ks, :] += torch.matmul(p.transpose(-1, -2), go)
            ds = p * (torch.matmul(go, vc.transpose(-1, -2)) - delta[..., qs, :])
            dq[..., qs, :] += torch.matmul(ds, kc) * scale
            dk[..., ks, :] += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
