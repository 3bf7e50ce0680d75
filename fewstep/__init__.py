"""fewstep: distill multi-step diffusion and flow-matching models into 1-8 step students."""

__version__ = "0.1.0"
