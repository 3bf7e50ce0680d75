"""rCM: sCM + DMD with a fake score; schedule, roles and one update of each phase."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.consistency.rcm import RCM, RCMConfig, backsim_angles, sample_u_dmd
from fewstep.objectives.dmd.roles import adapter_parameters
from fewstep.objectives.protocol import OBJECTIVES, Batch
from tests.helpers import single_thread  # noqa: F401 (fixture)


def test_schedule_and_time_sampler():
    assert OBJECTIVES.get("rcm") is RCM
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))
    objective = RCM(RCMConfig(tangent_warmup_steps=3), teacher, Student.lora(teacher, rank=4))
    phases = [objective.phase(s) for s in range(13)]
    assert phases == ["student"] * 4 + ["fake_score"] * 4 + ["student"] + ["fake_score"] * 4  # rCM: 1 per 5
    assert [objective.backsim_steps(s) for s in (3, 8, 13, 18, 23)] == [1, 2, 3, 4, 1]
    u = sample_u_dmd(20000, 5.0, 0.0, math.pi / 2, torch.Generator().manual_seed(0))
    s = torch.sin(u) / (torch.sin(u) + torch.cos(u))
    assert abs(float(s.median()) - 5 * 0.5 / (1 + 4 * 0.5)) < 0.02  # shift 5 maps the median 0.5 to 5/6


def test_backsim_times_start_at_noise_and_go_down():
    """rCM's backward simulation: pure noise first, then p_D draws forced monotone per sample."""
    top = torch.tensor(math.atan(80.0))
    angles = backsim_angles(512, 4, top, 5.0, 1e-3, top.item(), torch.Generator().manual_seed(0))
    assert angles.shape == (4, 512)
    assert torch.all(angles[0] == top)
    assert torch.all(angles[1:] <= angles[:-1]) and torch.all(angles[1:] >= 1e-3)
    assert float((angles[1] < angles[0]).float().mean()) > 0.5  # most draws are below the top
    assert float(angles[1].std()) > 0.05  # random per sample, not the sampler's fixed angles
    assert float((angles[3] < angles[1]).float().mean()) > 0.5  # the min makes later steps lower


def test_student_and_critic_updates_touch_their_own_adapter_only():
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))
    student = Student.lora(teacher, rank=4)
    objective = RCM(RCMConfig(tangent_warmup_steps=1, critic_steps_per_student_step=1, guidance_scale=2.0),
                    teacher, student)  # fmt: skip
    groups = objective.trainable()
    assert set(groups) == {"student", "fake_score"}
    names = {k: {id(p) for p in m.parameters()} for k, m in groups.items()}
    assert not names["student"] & names["fake_score"]  # disjoint groups on one shared base
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    auxiliary = objective.auxiliary()  # sCM's weighting, trained by the student's optimizer
    assert set(auxiliary) == {"student"}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]
                                 + (list(auxiliary[k].parameters()) if k in auxiliary else []), lr=1e-2)
            for k, m in groups.items()}  # fmt: skip
    backbone = student.denoiser.backbone
    fake_before = {k: v.clone() for k, v in adapter_parameters(backbone, "fake").items()}
    student_before = {k: v.clone() for k, v in adapter_parameters(backbone, "default").items()}
    x = torch.randn(latent_shape(teacher, 2))
    with torch.no_grad():
        teacher_out = teacher.predict(x, torch.tensor([0.5, 0.7]), cond).x0
    seen = []
    for step in range(3):  # student (sCM only), student (sCM + DMD), critic
        phase = objective.phase(step)
        out = objective.loss(Batch(cond=cond, uncond=uncond, x0=torch.randn(shape)), step, phase)
        assert math.isfinite(out.metrics["loss"])
        opts[phase].zero_grad()
        out.loss.backward()
        opts[phase].step()
        seen.append((phase, sorted(k.split("/")[0] for k in out.metrics if "/" in k)))
        if step == 1:
            assert all(torch.equal(v, fake_before[k]) for k, v in adapter_parameters(backbone, "fake").items())
    assert [p for p, _ in seen] == ["student", "student", "fake_score"]
    assert "dmd" not in seen[0][1] and "dmd" in seen[1][1] and "critic" in seen[2][1]
    assert any(not torch.equal(v, fake_before[k]) for k, v in adapter_parameters(backbone, "fake").items())
    assert any(not torch.equal(v, student_before[k]) for k, v in adapter_parameters(backbone, "default").items())
    with torch.no_grad():  # the teacher is still the frozen base
        assert torch.equal(teacher.predict(x, torch.tensor([0.5, 0.7]), cond).x0, teacher_out)
