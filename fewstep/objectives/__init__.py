"""Objectives, one package per family; each module registers itself in ``OBJECTIVES`` under its own module name.

* ``diffusion``: plain denoising fine-tune (the baseline);
* ``dmd/``: ``dmd2`` (with Decoupled DMD as an option), ``phased_dmd``;
* ``consistency/``: ``lcm``, ``pcm`` (PCM and Hyper-SD), ``scm``, ``rcm``, ``tbcm`` (TrigFlow math in ``trigflow``);
* ``reflow/``: ``reflow`` (2-RF, rfpp, SlimFlow), ``instaflow``;
* ``guidance/``: ``guidance_distill`` (classic), ``agd``.

Importing this package registers every one.
"""

import importlib

from fewstep.data.batch import Batch
from fewstep.objectives.protocol import OBJECTIVES, BackboneUse, LossOutput, Objective, StudentSampler, StudentWriter

__all__ = ["OBJECTIVES", "BackboneUse", "Batch", "LossOutput", "Objective", "StudentSampler", "StudentWriter"]

MODULES = (
    "diffusion",
    "dmd.dmd2",
    "dmd.phased_dmd",
    "consistency.lcm",
    "consistency.pcm",
    "consistency.scm",
    "consistency.rcm",
    "consistency.tbcm",
    "reflow.reflow",
    "reflow.instaflow",
    "guidance.guidance_distill",
    "guidance.agd",
)

for _module in MODULES:
    importlib.import_module(f"fewstep.objectives.{_module}")
