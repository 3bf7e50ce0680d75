"""One AdamW and one LR schedule per trainable group (``objective.trainable()``), from the recipe's ``optim`` block;
the step guard's pieces (``StepRollback``, ``weights_problem``); and ``apply_hyperparameters``, which makes a resumed
run use the recipe's optimizer settings rather than the checkpoint's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------------------------------------------------
# Guarding a step: undo it, check the weights it left
# ---------------------------------------------------------------------------------------------------------------------


class FlatCopy:
    """A copy of a fixed list of tensors in one contiguous buffer per device and dtype, refreshed with one
    ``torch.cat`` per buffer (on a CPU, where foreach ops are not fused, a per-tensor op costs microseconds each:
    a LoRA has hundreds of tensors). ``restore`` writes the copy back. The flat views into the tensors are rebuilt
    whenever a tensor's storage moved (``data_ptr``).

    Args:
        tensors: the tensors (e.g. one optimizer's parameters).
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = list(tensors)
        self._ptrs: tuple[int, ...] | None = None
        self._groups: list[tuple[list[Tensor], list[Tensor], Tensor]] = []  # (tensors, their flat views, buffer)

    @torch.no_grad()
    def take(self) -> list[Tensor]:
        """Copy the tensors now; returns the buffers (flat, one per device and dtype)."""
        ptrs = tuple(t.data_ptr() for t in self.tensors)
        if ptrs != self._ptrs:
            self._build()
            self._ptrs = ptrs
        for tensors, views, buffer in self._groups:
            if views:
                torch.cat(views, out=buffer)
            else:  # a non-contiguous tensor has no flat view: copied on its own
                buffer.copy_(tensors[0].reshape(-1))
        return [buffer for _, _, buffer in self._groups]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the last copy back into the tensors (bit for bit)."""
        for tensors, views, buffer in self._groups:
            if views:
                torch._foreach_copy_(views, list(buffer.split([v.numel() for v in views])))
            else:
                tensors[0].copy_(buffer.view_as(tensors[0]))

    def _build(self) -> None:
        groups: dict[tuple[Any, Any], list[Tensor]] = {}
        self._groups = []
        for t in self.tensors:
            if t.is_contiguous():
                groups.setdefault((t.device, t.dtype), []).append(t)
            else:
                self._groups.append(([t], [], torch.empty(t.numel(), device=t.device, dtype=t.dtype)))
        for (device, dtype), tensors in groups.items():
            views = [t.detach().view(-1) for t in tensors]
            self._groups.append(
                (tensors, views, torch.empty(sum(v.numel() for v in views), device=device, dtype=dtype))
            )


class StepRollback:
    """The parameters of one optimizer copied before its step and written back when the step is refused (one
    ``FlatCopy``: as much memory again as the parameters). AdamW's moments and step count keep the refused step:
    its gradient was finite (a non-finite one skips the step before it is taken), so they stay finite.

    Args:
        params: the optimizer's parameters (every ``param_groups`` entry).
    """

    def __init__(self, params: list[Tensor]) -> None:
        self._copy = FlatCopy(params)

    def take(self) -> None:
        self._copy.take()

    def restore(self) -> None:
        self._copy.restore()


class WeightCheck:
    """``max |w|`` over one optimizer's parameters after every step, cheaply: on a CPU through a ``FlatCopy`` and one
    reduction per buffer; elsewhere with ``torch._foreach_norm`` (one fused kernel, no copy).

    Args:
        params: the parameters to check.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = list(params)
        self._copy = FlatCopy(self.params) if all(p.device.type == "cpu" for p in self.params) else None

    def max_abs(self) -> float:
        """The largest ``|w|`` (NaN if any weight is NaN, inf if any is infinite)."""
        if self._copy is None:
            return max_abs(self.params)
        values = [v for buffer in self._copy.take() if buffer.numel() for v in torch.aminmax(buffer)]
        return max((abs(float(v)) for v in values), default=0.0, key=lambda v: (math.isnan(v), v))


def max_abs(tensors: list[Tensor]) -> float:
    """The largest ``|x|`` over ``tensors`` (NaN if any element is NaN, inf if any is infinite; 0 for none), with one
    fused reduction and one device sync."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return 0.0
    norms = torch._foreach_norm(floats, ord=math.inf)  # per tensor max |x|; NaN propagates
    device = norms[0].device
    return float(torch.stack([n.to(device, torch.float32) for n in norms]).max())


def weights_problem(named: dict[str, list[Tensor]], limit: float) -> str | None:
    """``None`` when every tensor of every entry of ``named`` is finite with ``|x| <= limit``, else what is wrong,
    naming the entries (e.g. ``"student: max |w| = nan; ema/student: max |w| = 3.2e+05"``)."""
    bad = []
    for name, tensors in named.items():
        value = max_abs(tensors)
        if not math.isfinite(value) or value > limit:
            bad.append(f"{name}: max |w| = {value:.4g}")
    return "; ".join(bad) or None


# ---------------------------------------------------------------------------------------------------------------------
# Resuming with changed settings
# ---------------------------------------------------------------------------------------------------------------------


def apply_hyperparameters(optimizers: dict[str, Any], schedulers: dict[str, Any], optim_cfg: OptimConfig) -> list[str]:
    """Give optimizers and schedules loaded from a checkpoint the recipe's ``lr`` (``group_lr``), ``weight_decay``,
    ``betas`` and ``eps``: a schedule's base LR becomes the recipe's, and the current LR is recomputed from it at the
    schedule's position. Returns ``"<group> <key> <old> -> <new>"`` for each change (empty when none)."""
    changes = []
    for name, optimizer in optimizers.items():
        scheduler = schedulers[name]
        lr = float(optim_cfg.group_lr.get(name, optim_cfg.lr))
        wanted = {
            "weight_decay": float(optim_cfg.weight_decay),
            "betas": tuple(optim_cfg.betas),
            "eps": float(optim_cfg.eps),
        }
        before = len(changes)
        old_bases = list(getattr(scheduler, "base_lrs", [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]))
        if any(base != lr for base in old_bases):
            changes.append(f"{name} lr {_fmt(old_bases[0])} -> {_fmt(lr)}")
        for key, value in wanted.items():
            old = optimizer.param_groups[0].get(key)
            if (tuple(old) if isinstance(old, list | tuple) else old) != value:
                changes.append(f"{name} {key} {_fmt(old)} -> {_fmt(value)}")
        if len(changes) == before:
            continue  # as saved: nothing is recomputed, so an unchanged resume stays bit-exact
        lambdas = getattr(scheduler, "lr_lambdas", None)
        for k, group in enumerate(optimizer.param_groups):
            group.update(wanted)
            if lambdas is not None:  # LambdaLR (every diffusers schedule): lr = base · λ(position)
                group["lr"] = lr * lambdas[k](scheduler.last_epoch)
            else:  # any multiplicative schedule: keep the factor it reached
                group["lr"] = group["lr"] * lr / old_bases[k]
            group["initial_lr"] = lr
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr] * len(optimizer.param_groups)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)
