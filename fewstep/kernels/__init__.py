"""Kernels: the attention JVP (fused CUDA op in csrc/ with a pure-PyTorch tiled reference) and the route that makes
``torch.func.jvp`` run through diffusers attention."""

from fewstep.kernels.attention import AttentionWithJVP, attention, attention_jvp
from fewstep.kernels.backends import set_forward_attention
from fewstep.kernels.reference import attention_backward_reference, attention_jvp_reference
from fewstep.kernels.routing import route_attention

__all__ = [
    "AttentionWithJVP",
    "attention",
    "attention_backward_reference",
    "attention_jvp",
    "attention_jvp_reference",
    "route_attention",
    "set_forward_attention",
]
