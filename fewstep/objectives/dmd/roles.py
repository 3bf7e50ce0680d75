"""One frozen base for every role: teacher = base with adapters off, student = adapter ``default``,
fake score = adapter ``fake`` on the same module.

The trainer builds one optimizer per ``objective.trainable()`` group and hands each group to
``accelerator.prepare`` (DDP). Two adapters on one backbone must therefore appear as two modules whose
``parameters()`` are disjoint, or DDP would expect gradients for the other role's adapter and hang or fail.
``AdapterRole`` is such a view: it registers only its adapter's parameters (the same ``Parameter`` objects as in
the backbone, so no copy) and holds the backbone unregistered; its ``forward`` switches the active adapter for the
duration of the call. Switching sets peft's ``_active_adapter`` on each LoRA layer directly: peft's own
``set_adapter`` also flips ``requires_grad``, which would change what DDP synchronises.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from torch import nn

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.student import Student, adapter_switched, adapters_disabled, tuner_layers
from fewstep.models.teacher import Teacher
from fewstep.noise.convert import Prediction

if TYPE_CHECKING:
    from peft import LoraConfig

STUDENT_ADAPTER = "default"
FAKE_ADAPTER = "fake"


def active_adapter(module: nn.Module, name: str) -> AbstractContextManager[None]:
    """Run ``module`` with only LoRA adapter ``name`` active (restored afterwards, even on error)."""
    return adapter_switched(module, name)


def adapter_parameters(module: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of LoRA adapter ``name`` (peft keys ``...lora_A.<name>.weight``)."""
    marker = f".{name}."
    return {k: p for k, p in module.named_parameters() if "lora_" in k and marker in f"{k}."}


def add_adapter(backbone: nn.Module, config: LoraConfig, name: str) -> None:
    """Add a second LoRA adapter ``name`` to a backbone that already carries the student's, keeping the student's
    adapter active and every adapter's weights trainable (diffusers' ``add_adapter`` activates the new one and
    peft freezes the inactive ones)."""
    from peft import inject_adapter_in_model

    active = [layer._active_adapter for layer in tuner_layers(backbone)]
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        if hasattr(backbone, "add_adapter"):
            backbone.add_adapter(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, backbone, adapter_name=name)
    new_layers = list(tuner_layers(backbone))
    for layer, before in zip(new_layers, active):
        layer._active_adapter = before
    for key, p in backbone.named_parameters():
        p.requires_grad_("lora_" in key)


class AdapterRole(nn.Module):
    """One LoRA adapter of a shared backbone seen as its own module: ``forward(x, τ, cond) -> Prediction``.

    Args:
        denoiser: the shared denoiser (kept unregistered: ``parameters()`` are this adapter's only).
        adapter_name: the peft adapter this role runs with.
        within: only the adapter's weights inside this submodule of the backbone (e.g. ``high``, one of Wan 2.2's
            experts): the role trains that part; the forward still runs the whole backbone under the adapter.
    """

    def __init__(self, denoiser: Denoiser, adapter_name: str, within: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_denoiser", denoiser)  # unregistered on purpose (see module docstring)
        self.adapter_name = adapter_name
        params = adapter_parameters(denoiser.backbone, adapter_name)
        if within is not None:
            params = {k: p for k, p in params.items() if k.startswith(f"{within}.")}
        if not params:
            where = f" inside {within!r}" if within is not None else ""
            raise ValueError(f"The backbone carries no LoRA adapter {adapter_name!r}{where}.")
        self.lora = nn.ParameterDict({k.replace(".", "__"): p for k, p in params.items()})

    @property
    def denoiser(self) -> Denoiser:
        return self._denoiser

    def forward(self, x: Any, tau: Any, cond: Conditioning) -> Prediction:
        with active_adapter(self._denoiser.backbone, self.adapter_name):
            return self._denoiser(x, tau, cond)


class BaseRole(nn.Module):
    """A role with its own full copy of the base (adapters of the copy disabled): the full-weight fake score."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        backbone = copy.deepcopy(denoiser.backbone)
        for key, p in backbone.named_parameters():
            p.requires_grad_("lora_" not in key)
        backbone.train()
        self.denoiser = Denoiser(backbone, denoiser.schedule, denoiser.prediction_type, denoiser._adapter)

    def forward(self, x: Any, tau: Any, cond: Conditioning) -> Prediction:
        with adapters_disabled(self.denoiser.backbone):
            return self.denoiser(x, tau, cond)


def student_role(student: Student, shared_fake: bool) -> nn.Module:
    """The student's trainable group: the ``Student`` itself, or an ``AdapterRole`` when a fake adapter shares its
    backbone (so the two groups' parameters are disjoint)."""
    return AdapterRole(student.denoiser, STUDENT_ADAPTER) if shared_fake else student


def fake_role(student: Student, teacher: Teacher, kind: str, rank: int, alpha: float | None) -> nn.Module:
    """The fake score ``F_ψ``, initialised as the teacher.

    Args:
        student: the student (its backbone is the shared base when it is a LoRA).
        teacher: the teacher (a full fake score copies its base).
        kind: ``lora`` (a second adapter on the shared base; needs a LoRA student) or ``full`` (a copy of the base).
        rank, alpha: LoRA rank and alpha of the fake adapter.
    """
    if kind == "full":
        return BaseRole(teacher.denoiser)
    if not student.is_lora:
        raise ValueError(
            "objective.fake_score=lora needs a LoRA student (student.kind: lora) so both share one frozen base; "
            "with a full student use fake_score: full."
        )
    from peft import LoraConfig

    base = student.lora_config
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=base.target_modules,
        lora_dropout=0.0,
        init_lora_weights=True,  # B = 0: the fake score starts exactly as the teacher
    )
    # The teacher needs no new view: Student.lora's "adapters disabled" switches off every adapter of the base,
    # this one included, and keeps every adapter's requires_grad.
    add_adapter(student.denoiser.backbone, config, FAKE_ADAPTER)
    return AdapterRole(student.denoiser, FAKE_ADAPTER)
