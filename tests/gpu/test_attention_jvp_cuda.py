"""The fused CUDA attention JVP against the reference (runs only where a CUDA GPU is present)."""

from __future__ import annotations

import pytest
import torch

from fewstep.kernels import attention_jvp, attention_jvp_reference, route_attention
from fewstep.kernels.cuda import unsupported_reason

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (2e-2, 6e-2), torch.float16: (3e-3, 1e-2)}  # (O, Ȯ)


def make(batch, heads, len_q, len_k, dim, dtype, scale_q=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, heads, len_q, dim), (batch, heads, len_k, dim), (batch, heads, len_k, dim)]
    primals = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    primals[0] = primals[0] * scale_q
    tangents = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    return [t.to(dtype) for t in primals], [t.to(dtype) for t in tangents]


def check(primals, tangents, mask=None):
    dtype = primals[0].dtype
    assert unsupported_reason(*primals, mask) is None
    out, tangent = attention_jvp(*primals, *tangents, mask=mask, backend="cuda")
    ref_out, ref_tangent, _ = attention_jvp_reference(*(t.double() for t in primals + tangents), mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()
    tol_o, tol_t = TOLERANCE[dtype]
    scale = float(ref_tangent.abs().max())
    assert (out.double() - ref_out).abs().max() < tol_o * max(1.0, float(ref_out.abs().max()))
    assert (tangent.double() - ref_tangent).abs().max() < tol_t * max(1.0, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("len_q,len_k", [(256, 256), (300, 77), (1, 513)])
def test_matches_reference(dtype, dim, len_q, len_k):
    check(*make(2, 3, len_q, len_k, dim, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_and_fully_masked_rows(dtype):
    primals, tangents = make(2, 2, 70, 50, 64, dtype)
    padding = (
        torch.arange(50, device="cuda")[None, None, None, :]
        < torch.tensor([50, 17], device="cuda")[:, None, None, None]
    )
    check(primals, tangents, padding)
    additive = torch.randn(70, 50, device="cuda")
    check(primals, tangents, additive)
    rows = torch.ones(70, 50, dtype=torch.bool, device="cuda")
    rows[5] = False
    out, tangent = attention_jvp(*primals, *tangents, mask=rows, backend="cuda")
    assert (out[..., 5, :] == 0).all() and (tangent[..., 5, :] == 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all()


def test_extreme_logits_and_long_sequences():
    check(*make(1, 2, 4096, 4096, 128, torch.bfloat16, scale_q=40.0))
    check(*make(1, 1, 16384, 16384, 64, torch.float16))


def test_non_contiguous_inputs_as_diffusers_passes_them():
    q, k, v = (torch.randn(2, 96, 4, 64, device="cuda").transpose(1, 2) for _ in range(3))  # [B, H, L, D] views
    dq, dk, dv = (torch.randn_like(t) for t in (q, k, v))
    check([q, k, v], [dq, dk, dv])


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_jvp_through_tiny_models_with_the_cuda_op(family):
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.models.backbones import latent_shape
    from fewstep.models.loading import load_teacher
    from fewstep.models.prompts import encode_prompts

    cfg = SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32", guidance_scale=1.0,
                          revision=None, variant=None)  # fmt: skip
    teacher = load_teacher(cfg)
    teacher.denoiser.to("cuda")
    teacher.pipeline.to("cuda")
    cond, _ = encode_prompts(teacher, ["a red square"])
    x = torch.randn(latent_shape(teacher, 1), device="cuda")
    tau = torch.tensor([0.5], device="cuda")

    def fn(x):
        return teacher.denoiser.raw(x, tau, cond)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with torch.no_grad(), route_attention(teacher.denoiser.backbone):
        mine = torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
