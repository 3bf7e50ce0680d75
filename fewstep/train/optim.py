"""One AdamW and one LR schedule per trainable group (``objective.trainable()``), from the recipe's ``optim`` block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fewstep.train.ema import trainable_parameters

if TYPE_CHECKING:
    from fewstep.config.schema import OptimConfig


def build_optimizers(
    groups: dict[str, nn.Module], optim_cfg: OptimConfig, auxiliary: dict[str, nn.Module] | None = None
) -> dict[str, torch.optim.AdamW]:
    """AdamW over the parameters that require grad of each group, then of its ``auxiliary`` module if it has one
    (``objective.auxiliary()``); ``optim.group_lr[name]`` overrides ``optim.lr``."""
    auxiliary = auxiliary or {}
    unknown = sorted(set(optim_cfg.group_lr) - set(groups))
    if unknown:
        raise ValueError(
            f"optim.group_lr names {unknown}, which this objective does not train; its groups are "
            f"{sorted(groups)}. Remove those keys or rename them."
        )
    optimizers = {}
    for name, module in groups.items():
        params = list(trainable_parameters(module).values())
        if not params:
            raise ValueError(
                f"Trainable group {name!r} has no parameter that requires grad. For a LoRA student check "
                "student.lora.target_modules; for a full student the objective must not freeze it."
            )
        if name in auxiliary:
            params += list(trainable_parameters(auxiliary[name]).values())
        optimizers[name] = torch.optim.AdamW(
            params,
            lr=float(optim_cfg.group_lr.get(name, optim_cfg.lr)),
            betas=tuple(optim_cfg.betas),
            weight_decay=float(optim_cfg.weight_decay),
            eps=float(optim_cfg.eps),
        )
    return optimizers


def build_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], optim_cfg: OptimConfig, max_steps: int
) -> dict[str, Any]:
    """diffusers' ``get_scheduler`` per optimizer; each steps once per step of its own optimizer."""
    from diffusers.optimization import get_scheduler

    return {
        name: get_scheduler(
            optim_cfg.lr_scheduler,
            optimizer=opt,
            num_warmup_steps=int(optim_cfg.warmup_steps),
            num_training_steps=int(max_steps),
        )
        for name, opt in optimizers.items()
    }
