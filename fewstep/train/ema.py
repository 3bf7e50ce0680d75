"""Exponential moving average of the trainable weights: ``θ_ema ← d·θ_ema + (1 − d)·θ`` after each optimizer step.

Only parameters that require grad are averaged (a LoRA student: its adapters), in fp32, per trainable group. With
``warmup`` (the default, as diffusers' ``EMAModel``) the decay of a group's k-th update is ``min(d, (1 + k)/(10 + k))``
(0 for the first), so a network trained from scratch is not averaged with its random start for thousands of steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The weights that train: parameters with ``requires_grad``; for a full model (nothing frozen) also its
    persistent buffers (those of ``state_dict``; a non-persistent one, such as Wan's rotary tables, is rebuilt from
    the config). A LoRA student therefore saves only its adapters."""
    state = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    if all(p.requires_grad for p in module.parameters()):
        state.update(persistent_buffers(module))
    return state


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """``name -> buffer`` for every buffer ``state_dict`` holds (``register_buffer(..., persistent=False)`` ones are
    left out)."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer.detach()
    return out


def shape_mismatches(expected: dict[str, Tensor], given: dict[str, Tensor]) -> list[str]:
    """``"<key>: <given shape> for <expected shape>"`` for every shared key whose shapes differ (copying such a
    tensor would broadcast it silently, or fail deep inside torch)."""
    return [
        f"{key}: {list(given[key].shape)} for {list(t.shape)}"
        for key, t in expected.items()
        if key in given and tuple(given[key].shape) != tuple(t.shape)
    ]


def shape_problems(expected: dict[str, Tensor], given: dict[str, Tensor]) -> str:
    """``""`` when ``given`` has exactly the keys of ``expected``, each with exactly its shape; else what differs
    (``missing [...], unexpected [...], other shapes ["<key>: <given> for <expected>"]``, five of each at most)."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    reshaped = shape_mismatches(expected, given)
    if not (missing or unexpected or reshaped):
        return ""
    return f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {reshaped[:5]}"


class EMA:
    """EMA shadows of every trainable group.

    Args:
        modules: the trainable groups by name (``objective.trainable()``, unwrapped).
        decay: ``d`` in ``θ_ema ← d·θ_ema + (1 − d)·θ``.
        warmup: diffusers ``EMAModel``'s default decay warmup (``train.ema_warmup``).
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in [0, 1) (e.g. 0.999), or null to turn EMA off.")
        self.decay, self.warmup = decay, warmup
        self.modules = modules
        self.updates = {group: 0 for group in modules}  # updates done per group (saved with checkpoints)
        # the averaged parameters, listed once: walking a large backbone's named_parameters each step costs ms
        self._params = {group: trainable_parameters(m) for group, m in modules.items()}
        self.shadow: dict[str, dict[str, Tensor]] = {
            group: {n: p.detach().float().clone() for n, p in params.items()} for group, params in self._params.items()
        }

    @torch.no_grad()
    def update(self, group: str) -> None:
        """Average the current weights of ``group`` into its shadow (call after that group's optimizer step)."""
        params = self._params[group]
        decay = self.decay_of_next_update(group)
        for name, s in self.shadow[group].items():
            s.lerp_(params[name].detach().float(), 1.0 - decay)
        self.updates[group] += 1

    def decay_of_next_update(self, group: str) -> float:
        """``d``; with ``warmup`` ``min(d, (1 + k)/(10 + k))`` after ``k`` updates, 0 for the first (diffusers)."""
        k = self.updates[group]
        if not self.warmup:
            return self.decay
        return 0.0 if k == 0 else min(self.decay, (1 + k) / (10 + k))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the modules (for sampling), restoring the live ones afterwards."""
        backup = {
            g: {n: p.detach().clone() for n, p in trainable_parameters(m).items()} for g, m in self.modules.items()
        }
        self._copy(self.shadow)
        try:
            yield
        finally:
            self._copy(backup)

    @torch.no_grad()
    def _copy(self, source: dict[str, dict[str, Tensor]]) -> None:
        """Copy ``{group: {name: tensor}}`` into the trainable parameters; names and shapes must match exactly (a
        broadcasting copy would silently spread one row over a whole matrix)."""
        params = {group: trainable_parameters(m) for group, m in self.modules.items()}
        problems = shape_problems(
            {f"{g}/{n}": p for g, d in params.items() for n, p in d.items()},
            {f"{g}/{n}": t for g, d in source.items() for n, t in d.items()},
        )
        if problems:
            raise ValueError(
                f"EMA shadows do not fit the trainable parameters ({problems}): the trainable parameters changed "
                "after the EMA was built. Build the EMA over the modules as they are trained."
            )
        for group, d in params.items():
            for name, p in d.items():
                p.copy_(source[group][name])

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<group>/<param>": tensor}`` (a safetensors-ready dict)."""
        return {f"{g}/{n}": t for g, d in self.shadow.items() for n, t in d.items()}

    def load_state_dict(self, state: dict[str, Tensor], updates: dict[str, int] | None = None) -> None:
        """Load the shadows and the update counts (``None``, from a checkpoint that has none: warm-up over)."""
        problems = shape_problems(self.state_dict(), state)
        if problems:
            raise ValueError(
                f"EMA state does not match the trainable weights ({problems}). Resume with the same student and "
                "objective settings."
            )
        for key, t in state.items():
            group, name = key.split("/", 1)
            self.shadow[group][name].copy_(t)
        self.updates = {group: 10**9 for group in self.modules} if updates is None else {**self.updates, **updates}
