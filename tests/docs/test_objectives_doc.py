"""docs/objectives.md runs as written: its Python blocks, in order, in a fresh directory. The example objective
registers itself, passes the protocol check, trains through the trainer, samples and exports."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from fewstep.objectives import OBJECTIVES, Objective

DOC = Path(__file__).resolve().parents[2] / "docs" / "objectives.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_objectives_doc_runs_and_the_one_step_student_beats_the_teachers_one_step(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 4, "the objective, training, sampling and export are four python blocks"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(OBJECTIVES, "_items", dict(OBJECTIVES._items))  # the doc's registration ends with the test
    module = types.ModuleType("objectives_doc")  # run as an imported module (pydantic resolves annotations there)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    scope = vars(module)
    exec(compile("\n".join(blocks), str(DOC), "exec"), scope)  # the doc's own asserts check its claims

    assert OBJECTIVES.get("one_step_kd") is scope["OneStepKD"]
    objective = scope["objective"]
    assert isinstance(objective, Objective) and type(objective) is scope["OneStepKD"]
    run_dir = Path(scope["run_dir"])
    assert (run_dir / "checkpoints" / "step_00000020" / "COMPLETE").is_file()
    assert scope["student_error"] < 0.5 * scope["teacher_error"], (scope["student_error"], scope["teacher_error"])
    out = Path(scope["out"])
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "fewstep_student.json"):
        assert (out / name).is_file(), name
    assert scope["spec"].scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert scope["spec"].steps[1]["sigmas"] == [1.0]
