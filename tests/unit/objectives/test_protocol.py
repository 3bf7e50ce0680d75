"""Every registered objective implements every member of the ``Objective`` protocol, with compatible signatures,
and a built one passes the runtime check (no member is probed for with ``getattr`` anywhere)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.objectives import OBJECTIVES, Objective
from fewstep.objectives.diffusion import Diffusion, DiffusionConfig
from fewstep.objectives.spec import SamplingSpec

MEMBERS = sorted(set(Objective.__annotations__) | {n for n in vars(Objective) if not n.startswith("_")})
METHODS = [n for n in MEMBERS if callable(vars(Objective).get(n))]
ROOT = Path(__file__).resolve().parents[3]


def test_the_protocol_states_what_the_trainer_and_export_use():
    assert MEMBERS == sorted([
        "Config", "bypasses_prepared", "trainable", "auxiliary", "attach", "prepare", "phase", "loss", "on_step_end",
        "sampler", "sampling_spec", "export_extra", "state_dict", "load_state_dict",
    ])  # fmt: skip


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_registered_objective_implements_every_member(name):
    cls = OBJECTIVES.get(name)
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    assert not missing, f"{name} lacks {missing}"
    assert isinstance(cls.bypasses_prepared, bool)
    assert cls.Config.model_fields["name"].default == name  # the recipe block is discriminated on the registry name
    for method in METHODS:
        wanted = list(inspect.signature(getattr(Objective, method)).parameters.values())[1:]
        got = inspect.signature(getattr(cls, method)).parameters
        for param in wanted:  # the protocol's arguments by name, in order; further ones must have defaults
            assert param.name in got, f"{name}.{method} has no argument {param.name!r}"
        names = list(got)[1:]
        assert names[: len(wanted)] == [p.name for p in wanted], (
            f"{name}.{method}{inspect.signature(getattr(cls, method))}"
        )
        extra = [got[n] for n in names[len(wanted) :]]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}.{method}: {extra}"


def test_a_built_objective_passes_the_runtime_check_and_describes_its_export():
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp"))
    objective = Diffusion(DiffusionConfig(), teacher, Student.full(teacher))
    assert isinstance(objective, Objective)
    assert objective.auxiliary() == {} and objective.prepare(iter([])) is None
    spec = objective.sampling_spec()
    assert isinstance(spec, SamplingSpec) and spec.scheduler_class == "DDIMScheduler"
    assert spec.steps[25]["timesteps"][0] == 999 and spec.guidance_scale == teacher.guidance_scale
    assert not isinstance(object(), Objective)


def test_no_protocol_member_is_probed_for_and_no_objective_patches_the_teacher():
    """The trainer, export and evaluation call the members; none asks whether an objective has one. Teacher views
    go through ``Teacher.add_view``, never by assigning ``teacher.view``."""
    names = "|".join([*MEMBERS, "export_schedule", "recommended_guidance_scale", "scm_weighting"])
    probe = re.compile(rf"""(getattr|hasattr)\([^,()]+,\s*["']({names})["']""")
    patch = re.compile(r"\.view\s*=[^=]")
    found = []
    for path in sorted((ROOT / "fewstep").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if probe.search(line) or patch.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
