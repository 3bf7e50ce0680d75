"""The guided-output norm rules of noise.convert: ``rescale_to_norm`` (Qwen-Image's true CFG, DMD's
``real_cfg_normalize``) and its one-sided form ``cap_to_norm`` (Z-Image's ``cfg_normalization``)."""

import torch

from fewstep.noise.convert import cap_to_norm, rescale_to_norm

DIMS = (1, 2, 3)


def norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=DIMS)


def test_rescale_to_norm_keeps_the_direction_at_the_reference_length():
    x, ref = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    out = rescale_to_norm(x, ref, dim=DIMS)
    assert torch.allclose(norms(out), norms(ref), rtol=1e-5)
    cosine = (out * x).sum(DIMS) / (norms(out) * norms(x))
    assert torch.allclose(cosine, torch.ones(4), atol=1e-5)


def test_cap_to_norm_scales_down_only_the_samples_over_the_cap():
    ref = torch.randn(2, 2, 3, 3)
    x = torch.stack([ref[0] * 3.0, ref[1] * 0.5])  # sample 0 is 3× the reference's norm, sample 1 half of it
    out = cap_to_norm(x, ref, factor=1.5, dim=DIMS)
    assert torch.allclose(norms(out)[0], 1.5 * norms(ref)[0], rtol=1e-5)  # capped at 1.5× the reference
    assert torch.equal(out[1], x[1])  # under the cap: untouched, never raised
