"""Guidance distillation: ``guidance_distill`` (classic: a w-conditioned student reproduces CFG in one forward) and
``agd`` (adapter guidance distillation: small cross-attention adapters on the frozen base)."""
