"""Denoiser (backbone adapters), Teacher (+CFG), Student (LoRA/full), Conditioning.

Names are imported on first use so that light users (recipe validation) do not pay for peft and diffusers.
"""

import importlib

_EXPORTS = {
    "Conditioning": "fewstep.models.conditioning",
    "BACKBONES": "fewstep.models.backbones",
    "Denoiser": "fewstep.models.denoiser",
    "Student": "fewstep.models.student",
    "adapter_switched": "fewstep.models.student",
    "adapters_disabled": "fewstep.models.student",
    "tuner_layers": "fewstep.models.student",
    "GUIDANCE_CONVENTION": "fewstep.models.teacher",
    "Teacher": "fewstep.models.teacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fewstep.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
