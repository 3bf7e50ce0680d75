"""``fewstep plan``: how much GPU memory a recipe needs per rank, before anything loads.

The recipe's pipeline, teacher, student and objective are built on the meta device from configs (``meta``); every
parameter is counted once under the role that owns it (``inventory``); activations come from coefficients measured
on the tiny models and block sizes read off a meta forward (``activations``); ``layouts`` divides it all per rank for
DDP, FSDP2 and hybrid sharding. ``measure`` holds the exact CPU tensor-byte counter the coefficients and the checks of
the predictions use.
"""

from fewstep.plan.planner import GIB, Plan, layout_by_name, plan_recipe
from fewstep.plan.report import launch_command, render_text, to_json

__all__ = ["GIB", "Plan", "launch_command", "layout_by_name", "plan_recipe", "render_text", "to_json"]
