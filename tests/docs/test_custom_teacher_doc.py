"""docs/custom_teacher.md runs as written: its Python blocks, in order, in a fresh directory."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "custom_teacher.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_custom_teacher_doc_runs_and_the_student_beats_the_teacher_at_one_step(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 5, "the doc's five steps are five python blocks"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "custom_teacher_doc"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), scope)  # the doc's own assert checks the 1-step claim

    run_dir = Path(scope["run_dir"])
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "resolved_config.yaml").is_file()
    teacher_sw, student_sw = scope["teacher_sw"], scope["student_sw"]
    assert teacher_sw[50] < 0.25, teacher_sw  # the teacher itself is good when given its steps
    assert student_sw[1] < 0.3 and student_sw[2] < 0.3, student_sw
    assert student_sw[1] < teacher_sw[1] / 3 and student_sw[2] < teacher_sw[2], (student_sw, teacher_sw)
