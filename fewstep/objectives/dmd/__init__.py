"""Distribution matching: DMD2 (with Decoupled DMD as an option) and Phased DMD (ALGORITHMS §2–3).

The pure math other objectives reuse (rCM's DMD term) is ``fewstep.objectives.dmd.functional``.
"""

from fewstep.objectives.dmd import functional
from fewstep.objectives.dmd.functional import (
    backsim_depth,
    ca_gradient,
    denoising_loss,
    dm_gradient,
    gan_d_loss,
    gan_g_loss,
    injected_loss,
    per_sample_l1,
    student_taus,
    subinterval_flow_target,
    subinterval_x0_target,
)
from fewstep.objectives.dmd.objective import DMD2, DMD2Config
from fewstep.objectives.dmd.phased import PhasedDMD, PhasedDMDConfig, export_experts

__all__ = [
    "DMD2",
    "DMD2Config",
    "PhasedDMD",
    "PhasedDMDConfig",
    "export_experts",
    "backsim_depth",
    "ca_gradient",
    "denoising_loss",
    "dm_gradient",
    "functional",
    "gan_d_loss",
    "gan_g_loss",
    "injected_loss",
    "per_sample_l1",
    "student_taus",
    "subinterval_flow_target",
    "subinterval_x0_target",
]
