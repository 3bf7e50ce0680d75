"""The tiled reference attention JVP against torch.func.jvp through math SDPA and against finite differences."""

from __future__ import annotations

import pytest
import torch

from fewstep.kernels import attention_backward_reference, attention_jvp_reference
from tests.helpers import math_sdpa


def inputs(len_q=23, len_k=19, dim=16, dtype=torch.float64, seed=0, batch=2, heads=3, value_dim=None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, len_q, dim), (batch, heads, len_k, dim), (batch, heads, len_k, value_dim or dim)]
    primals = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    tangents = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return primals, tangents


def key_padding(batch=2, len_k=19, keep=(19, 11)):
    return torch.arange(len_k)[None, None, None, :] < torch.tensor(keep)[:, None, None, None]  # [b, 1, 1, k]


@pytest.mark.parametrize("len_q,len_k", [(23, 23), (23, 19), (5, 40)], ids=["self", "cross", "short-q"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_matches_torch_func_jvp_through_math_sdpa(len_q, len_k, mask_kind):
    (q, k, v), (dq, dk, dv) = inputs(len_q, len_k)
    mask = None
    if mask_kind == "bool":
        mask = key_padding(len_k=len_k, keep=(len_k, len_k // 2))
    elif mask_kind == "additive":
        mask = torch.randn(len_q, len_k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_out, ref_tangent = torch.func.jvp(lambda a, b, c: math_sdpa(a, b, c, mask), (q, k, v), (dq, dk, dv))
    out, tangent, lse = attention_jvp_reference(q, k, v, dq, dk, dv, mask, q_chunk=7, k_chunk=6)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-11, rtol=1e-10)
    scores = q @ k.transpose(-1, -2) / 4.0  # D = 16
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-12, rtol=1e-12)


def test_matches_central_finite_differences():
    (q, k, v), (dq, dk, dv) = inputs(value_dim=8)
    h = 1e-6
    plus, _, _ = attention_jvp_reference(q + h * dq, k + h * dk, v + h * dv)
    minus, _, _ = attention_jvp_reference(q - h * dq, k - h * dk, v - h * dv)
    _, tangent, _ = attention_jvp_reference(q, k, v, dq, dk, dv)
    torch.testing.assert_close(tangent, (plus - minus) / (2 * h), atol=1e-8, rtol=1e-7)


def test_tile_sizes_do_not_change_the_result():
    (q, k, v), (dq, dk, dv) = inputs(len_q=33, len_k=65, dtype=torch.float32)
    whole = attention_jvp_reference(q, k, v, dq, dk, dv, q_chunk=4096, k_chunk=4096)
    tiled = attention_jvp_reference(q, k, v, dq, dk, dv, q_chunk=5, k_chunk=8)
    for a, b in zip(whole, tiled):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    (q, k, v), (dq, dk, dv) = inputs(dtype=dtype)
    out, tangent, _ = attention_jvp_reference(q, k, v, dq, dk, dv, k_chunk=4)
    assert out.dtype == dtype and tangent.dtype == dtype
    exact = attention_jvp_reference(*(t.double() for t in (q, k, v, dq, dk, dv)))
    torch.testing.assert_close(out.double(), exact[0], atol=tol, rtol=tol)
    torch.testing.assert_close(tangent.double(), exact[1], atol=4 * tol, rtol=4 * tol)


def test_fully_masked_rows_are_zero_not_nan():
    (q, k, v), (dq, dk, dv) = inputs(len_q=6, len_k=5)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2] = False  # query row 2 sees no key
    out, tangent, lse = attention_jvp_reference(q, k, v, dq, dk, dv, mask, k_chunk=2)
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()
    assert (out[..., 2, :] == 0).all() and (tangent[..., 2, :] == 0).all()
    assert torch.isneginf(lse[..., 2]).all()
    rows = [0, 1, 3, 4, 5]
    ref_out, ref_t = torch.func.jvp(lambda a: math_sdpa(a, k, v, mask), (q,), (dq,))
    torch.testing.assert_close(out[..., rows, :], ref_out[..., rows, :])
    _, tangent_q = attention_jvp_reference(q, k, v, dq, None, None, mask)[:2]
    torch.testing.assert_close(tangent_q[..., rows, :], ref_t[..., rows, :])
    additive = torch.zeros(6, 5).masked_fill(~mask, float("-inf")).double()
    out_add, tangent_add, _ = attention_jvp_reference(q, k, v, dq, dk, dv, additive)
    torch.testing.assert_close(out_add, out)
    torch.testing.assert_close(tangent_add, tangent)


def test_extreme_logits_stay_finite_and_exact():
    (q, k, v), (dq, dk, dv) = inputs(len_q=9, len_k=31, dtype=torch.float32)
    q = q * 300.0  # logits of several thousand: a naive exp overflows
    out, tangent, lse = attention_jvp_reference(q, k, v, dq, dk, dv, k_chunk=4)
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all() and torch.isfinite(lse).all()
    exact = attention_jvp_reference(*(t.double() for t in (q, k, v, dq, dk, dv)))
    torch.testing.assert_close(out.double(), exact[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tangent.double(), exact[1], atol=1e-2, rtol=1e-3)


def test_backward_matches_autograd_through_math_sdpa():
    (q, k, v), _ = inputs(len_q=13, len_k=17, value_dim=8)
    mask = key_padding(len_k=17, keep=(17, 9))
    grad_out = torch.randn(2, 3, 13, 8, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (math_sdpa(*leaves, mask) * grad_out).sum().backward()
    out, _, lse = attention_jvp_reference(q, k, v, mask=mask)
    grads = attention_backward_reference(grad_out, q, k, v, out, lse, mask, q_chunk=4, k_chunk=5)
    for mine, leaf in zip(grads, leaves):
        torch.testing.assert_close(mine, leaf.grad, atol=1e-12, rtol=1e-10)


def test_shape_errors_name_the_shapes():
    (q, k, v), _ = inputs()
    with pytest.raises(ValueError, match="Attention shapes do not fit"):
        attention_jvp_reference(q, k[..., :8], v)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_jvp_reference(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool))
