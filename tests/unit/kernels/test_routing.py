"""``route_attention``: torch.func.jvp through real (tiny) diffusers models of every family (the JVP sCM, rCM and TBCM
take), equal to the math-attention result and to central finite differences."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fewstep.kernels import attention_jvp_reference, route_attention, routing
from fewstep.kernels.attention import AttentionWithJVP


def tiny_denoiser_fn(family: str):
    """``x ↦ raw output`` of the tiny teacher of ``family`` at τ = 0.5 for one prompt, through fewstep's adapter."""
    from fewstep.models.backbones import latent_shape
    from fewstep.models.loading import load_teacher
    from fewstep.models.prompts import FIRST_FRAME_REQUIRED, encode_prompts

    cfg = SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32", guidance_scale=1.0,
                          revision=None, variant=None)  # fmt: skip
    teacher = load_teacher(cfg)
    images = None
    if family in FIRST_FRAME_REQUIRED:  # image-to-video: the first frame's latents and image tokens join the input
        from PIL import Image

        side = latent_shape(teacher, 1)[-1] * 8
        pixels = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(3))
        images = [Image.fromarray(pixels.byte().numpy())]
    cond, _ = encode_prompts(teacher, ["a red square"], images=images)
    assert images is None or (cond.image_embeds is not None and cond.condition_latents is not None)
    tau = torch.tensor([0.5])
    x = torch.randn(latent_shape(teacher, 1), generator=torch.Generator().manual_seed(0))
    return (lambda x: teacher.denoiser.raw(x, tau, cond)), x, teacher.denoiser.backbone


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    text, t = torch.randn(1, 5, 32), torch.tensor([500])
    return (lambda x: model(x, t, text, return_dict=False)[0]), torch.randn(1, 4, 2, 8, 8), model


# Sana's linear attention takes ReLU of queries and keys: central differences there are only O(h) accurate across the
# kinks (measured error 0.055 at h = 1e-2, 6e-4 at 3e-4, for a derivative of magnitude 1.4), so a smaller step.
FD_STEP = {"sana": 3e-4}
# LTX-Video, PixArt-Σ and Sana pass the prompt mask to their cross-attention, HunyuanVideo 1.5 its joint mask over
# video and text tokens: masked attention always takes fewstep's route.
MASKED = {"ltx", "pixart_sigma", "sana", "hunyuan15", "hunyuan15_i2v"}
MASKED |= {"chroma"}  # its joint mask over T5 padding and image tokens, added to every attention's scores


def model_fn(name: str):
    return tiny_wan() if name == "wan" else tiny_denoiser_fn(name)


class CountingRoute:
    """Counts calls of the routed op (proves the route, not the math backend, computed the tangent)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        jvp = AttentionWithJVP.jvp

        def counted(ctx, *tangents):
            self.calls += 1
            return jvp(ctx, *tangents)

        monkeypatch.setattr(AttentionWithJVP, "jvp", staticmethod(counted))


@pytest.fixture(params=["attention", "math"])
def route(request, monkeypatch):
    """Which answer the route gives: fewstep's ``attention`` (forced: no score matrix counts as small) or PyTorch's
    math attention (what these small models get by default on a CPU)."""
    if request.param == "attention":
        monkeypatch.setattr(routing, "MATH_SCORES", 0)
    return request.param


@pytest.mark.parametrize(
    "name",
    [
        "sd15",
        "sdxl",
        "sd3",
        "flux",
        "wan",
        "sd35",
        "qwen_image",
        "wan21",
        "ltx",
        "pixart_sigma",
        "sana",
        "cogvideox",
        "flux2",
        "chroma",
        "zimage",
        "hunyuan15",
        "hunyuan15_i2v",
    ],
)
def test_jvp_through_the_model_equals_math_attention(name, route, monkeypatch):
    fn, x, model = model_fn(name)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="forward AD"):  # the default CPU SDPA has no forward-mode rule
        torch.func.jvp(fn, (x,), (dx,))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tangent = torch.func.jvp(fn, (x,), (dx,))
    counter = CountingRoute(monkeypatch)
    with torch.no_grad(), route_attention(model):
        out, tangent = torch.func.jvp(fn, (x,), (dx,))
    assert (counter.calls > 0) == (route == "attention" or name in MASKED), counter.calls
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it is the derivative: central finite differences
        h = FD_STEP.get(name, 1e-2)
        fd = (fn(x + h * dx) - fn(x - h * dx)) / (2 * h)
    assert (tangent - fd).abs().max() < 2e-3 * max(1.0, float(fd.abs().max()))


def test_routed_forward_is_unchanged_and_the_route_is_scoped():
    fn, x, model = model_fn("sd3")
    with torch.no_grad():
        plain = fn(x)
        with route_attention(model):
            routed = fn(x)
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError):  # the mode is gone after the block
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))


def test_route_restores_a_pinned_attention_backend():
    _, _, model = model_fn("flux")
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    for p in processors:
        p._attention_backend = "_native_math"
    with route_attention(model):
        assert all(p._attention_backend is None for p in processors)
    assert all(p._attention_backend == "_native_math" for p in processors)


def test_sdpa_arguments_causal_and_grouped_query():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dq, dk, dv = (torch.randn_like(t) for t in (q, k, v))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)

    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(sdpa, (q, k, v), (dq, dk, dv))
    with route_attention():
        mine = torch.func.jvp(sdpa, (q, k, v), (dq, dk, dv))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with route_attention(), pytest.raises(ValueError, match="dropout"):
        F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), dropout_p=0.1)


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_reference_never_builds_the_full_score_matrix():
    """Every intermediate of the reference is at most a tile (or an input/output): never L_q × L_k."""
    q, k, v = (torch.randn(1, 1, 1024, 8) for _ in range(3))  # inputs of 8,192 elements
    with LargestTensor() as largest:
        attention_jvp_reference(q, k, v, q, k, v, q_chunk=128, k_chunk=128)
    assert largest.numel == 128 * 128, largest.numel  # one score tile; the full matrix would be 1024 * 1024


def test_long_sequences_take_the_tiled_attention(monkeypatch):
    """Above ``MATH_SCORES`` the route never answers with the full-matrix math attention."""
    counter = CountingRoute(monkeypatch)
    q = torch.randn(1, 2, 64, 8)
    dq = torch.randn_like(q)
    monkeypatch.setattr(routing, "MATH_SCORES", 2 * 64 * 64 - 1)  # one element too few for this call
    with route_attention():
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (dq,))
    assert counter.calls == 1
    monkeypatch.setattr(routing, "MATH_SCORES", 2 * 64 * 64)
    with route_attention():
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (dq,))
    assert counter.calls == 1  # small enough: PyTorch's math attention answered
