"""Objectives register themselves in ``OBJECTIVES`` on import; importing this package registers every one."""

import importlib

from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, Objective, StudentSampler

__all__ = ["OBJECTIVES", "Batch", "LossOutput", "Objective", "StudentSampler"]

for _name in ("diffusion", "lcm", "dmd", "scm", "pcm", "tbcm", "rcm", "reflow", "instaflow", "guidance", "agd"):
    importlib.import_module(f"fewstep.objectives.{_name}")
