"""``Denoiser``: one backbone seen through the canonical parameterisation (one conversion point for every model).

A backbone adapter (registered by name in ``BACKBONES``) knows one model family's call signature and output type:
``adapter(backbone, x, timestep, cond) -> raw output`` with ``timestep = schedule.model_timestep(τ)``. The
``Denoiser`` adds the schedule and prediction type, and converts the raw output to ``Prediction(x0, eps)``.
Adapters (diffusers families and ``"custom"`` for any module) live in ``fewstep.models.backbones``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fewstep.models.backbones import BACKBONES, BackboneAdapter
from fewstep.models.conditioning import Conditioning
from fewstep.noise.convert import Prediction, check_prediction_type, to_x0_eps
from fewstep.noise.schedules import Schedule


def _registered_name(adapter: BackboneAdapter) -> str:
    """The name a registered adapter callable is known by (a student built from its teacher's callable keeps the
    family name, which the backbone's shape rules are keyed on); else the callable's own name."""
    for name in BACKBONES:
        if BACKBONES.get(name) is adapter:
            return name
    return getattr(adapter, "__name__", "callable")


class Denoiser(nn.Module):
    """``denoise(x_τ, τ, cond) -> Prediction(x0, eps)`` for any registered backbone.

    Args:
        backbone: the network (a diffusers model or any ``nn.Module``).
        schedule: the noise schedule it was trained with (``fewstep.noise``).
        prediction_type: what the backbone outputs (``epsilon``, ``sample``, ``v_prediction``, ``flow``, ``trigflow``).
        adapter: a name in ``BACKBONES`` or a callable ``(backbone, x, timestep, cond) -> output``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        adapter: str | BackboneAdapter = "custom",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.adapter_name = adapter if isinstance(adapter, str) else _registered_name(adapter)
        self._adapter = BACKBONES.get(adapter) if isinstance(adapter, str) else adapter

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: the backbone's first parameter's; for a module without parameters, its first
        floating-point buffer's; float32 for a module with neither."""
        for param in self.backbone.parameters():
            return param.dtype
        for buffer in self.backbone.buffers():
            if buffer.is_floating_point():
                return buffer.dtype
        return torch.float32

    def raw(self, x: Tensor, tau: Tensor, cond: Conditioning) -> Tensor:
        """The backbone's native output at ``(x_τ, τ)``; ``τ`` is ``[b]`` (a scalar is broadcast)."""
        tau = torch.as_tensor(tau, dtype=torch.float32, device=x.device)
        if tau.ndim == 0:
            tau = tau.expand(x.shape[0])
        timestep = self.schedule.model_timestep(tau).to(x.device)
        return self._adapter(self.backbone, x.to(self.dtype), timestep, cond)

    def to_prediction(self, raw: Tensor, x: Tensor, tau: Tensor) -> Prediction:
        tau = torch.as_tensor(tau, dtype=torch.float32, device=x.device)
        if tau.ndim == 0:
            tau = tau.expand(x.shape[0])
        return to_x0_eps(raw, x, self.schedule.alpha(tau), self.schedule.sigma(tau), self.prediction_type)

    def forward(self, x: Tensor, tau: Tensor, cond: Conditioning) -> Prediction:
        return self.to_prediction(self.raw(x, tau, cond), x, tau)

    def train(self, mode: bool = True) -> Denoiser:
        """``nn.Module.train``, skipped when every submodule is in ``mode`` already (a read-only scan instead of a
        write to each of the backbone's ~10³ modules: samplers switch modes on every call)."""
        if isinstance(mode, bool) and in_mode(self, mode):
            return self
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, schedule={self.schedule.kind!r}, prediction={self.prediction_type!r}"


_PLAIN_TRAIN = (nn.Module.train, Denoiser.train)  # ``train`` methods that only set ``training`` on the tree


def in_mode(module: nn.Module, mode: bool) -> bool:
    """Whether ``module.train(mode)`` would change nothing: every module of the tree has ``training == mode`` and
    none overrides ``train`` with side effects of its own. Stops at the first module that differs."""
    stack: list[nn.Module | None] = [module]
    pop, extend = stack.pop, stack.extend
    while stack:
        m = pop()
        if m is None:  # a submodule slot registered as None
            continue
        if m.training is not mode or type(m).train not in _PLAIN_TRAIN:
            return False
        extend(m._modules.values())
    return True


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block, its previous train/eval mode restored afterwards (samplers use it).

    A module already in eval mode throughout (e.g. inside ``Student.sampling()``) is left untouched: no mode is
    switched on entry, none restored on exit."""
    if in_mode(module, False):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
