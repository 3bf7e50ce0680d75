"""``attention``: SDPA as an autograd.Function with a forward-mode rule and a backward."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fewstep.kernels import attention, attention_jvp
from tests.helpers import math_sdpa


def make(len_q=11, len_k=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 2, len_q, 8), (2, 2, len_k, 8), (2, 2, len_k, 8)]
    primals = tuple(torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    return primals, tuple(torch.randn(s, generator=g, dtype=dtype) for s in shapes)


def test_torch_func_jvp_equals_math_sdpa():
    primals, tangents = make()
    mask = torch.rand(11, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[:, 0] = True
    out, tangent = torch.func.jvp(lambda q, k, v: attention(q, k, v, mask), primals, tangents)
    ref_out, ref_tangent = torch.func.jvp(lambda q, k, v: math_sdpa(q, k, v, mask), primals, tangents)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-11, rtol=1e-10)


def test_forward_ad_dual_tensors_and_partial_tangents():
    (q, k, v), (dq, _, _) = make()
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, dq), k, v)  # only q carries a tangent
        tangent = fwAD.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda q: math_sdpa(q, k, v), (q,), (dq,))
    torch.testing.assert_close(tangent, ref, atol=1e-11, rtol=1e-10)


def test_backward_equals_autograd_and_passes_gradcheck():
    (q, k, v), _ = make(len_q=4, len_k=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c), leaves)
    grad_out = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    (attention(*leaves) * grad_out).sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    (math_sdpa(*refs) * grad_out).sum().backward()
    for mine, ref in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-12, rtol=1e-10)


def test_gradient_through_the_primal_of_a_jvp_equals_plain_autograd():
    """sCM back-propagates the ordinary output of the same call whose tangent is the (detached) target."""
    (q, k, v), (dq, dk, dv) = make()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = torch.func.jvp(lambda a, b, c: attention(a, b, c), tuple(leaves), (dq, dk, dv))
    out.square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    math_sdpa(*refs).square().sum().backward()
    for mine, ref in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-11, rtol=1e-9)


def test_dispatch_falls_back_to_the_reference_on_cpu_and_explains_cuda():
    primals, tangents = make(dtype=torch.float32)
    out, tangent = attention_jvp(*primals, *tangents)
    ref_out, ref_tangent = torch.func.jvp(math_sdpa, tuple(primals), tuple(tangents))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cannot run here: tensors are on cpu"):
        attention_jvp(*primals, *tangents, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' is not one of"):
        attention_jvp(*primals, *tangents, backend="triton")


def test_forward_backend_choice_and_xformers_errors():
    from fewstep.kernels import set_forward_attention
    from fewstep.kernels.backends import xformers_unavailable_reason
    from fewstep.testing import load_tiny_pipeline

    unet = load_tiny_pipeline("sd15").unet
    set_forward_attention(unet, "sdpa")
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(ValueError, match="not one of sdpa, xformers"):
        set_forward_attention(unet, "flash")
    if xformers_unavailable_reason() is not None:
        with pytest.raises(RuntimeError, match="Cannot use xformers attention"):
            set_forward_attention(unet, "xformers")
