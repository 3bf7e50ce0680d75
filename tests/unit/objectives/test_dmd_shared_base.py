"""One frozen base for every DMD2 role: teacher = adapters off, student = adapter
``default``, fake score = adapter ``fake``, all on the same module; the trainable groups are disjoint."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from fewstep.objectives.protocol import Batch
from tests.helpers import single_thread  # noqa: F401 (fixture)


def build(fake_score: str, family: str = "sdxl"):
    torch.manual_seed(0)
    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}"))
    base_numel = sum(p.numel() for p in teacher.denoiser.backbone.parameters())
    student = Student.lora(teacher, rank=4, alpha=8)
    objective = DMD2(DMD2Config(num_student_steps=2, fake_score=fake_score, real_guidance_scale=3.0), teacher, student)
    return teacher, student, objective, base_numel


def storage_numel(*modules: torch.nn.Module) -> int:
    """Elements of every distinct parameter storage reachable from ``modules`` (a shared tensor counts once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_lora_dmd2_holds_one_copy_of_the_base():
    teacher, student, objective, base_numel = build("lora")
    groups = objective.trainable()
    student_ids = {id(p) for p in groups["student"].parameters()}
    fake_ids = {id(p) for p in groups["fake_score"].parameters()}
    assert student_ids and fake_ids and not student_ids & fake_ids, "the groups must be disjoint (one optimizer each)"
    adapters = sum(p.numel() for g in groups.values() for p in g.parameters())
    total = storage_numel(teacher.denoiser.backbone, student, *groups.values())
    assert total == base_numel + adapters  # no second (or third) copy of the base
    assert adapters < 0.5 * base_numel  # rank 4 on a tiny UNet
    assert all(p.requires_grad for g in groups.values() for p in g.parameters())
    assert not any(p.requires_grad for n, p in teacher.denoiser.backbone.named_parameters() if "lora_" not in n)

    _, _, full, full_base = build("full")
    total_full = storage_numel(full.teacher.denoiser.backbone, full.student, *full.trainable().values())
    assert total_full > 1.9 * full_base  # the full-weight fake score is a second copy


def test_roles_switch_adapters_on_one_module_and_keep_gradients_on():
    teacher, student, objective, _ = build("lora")
    cond, uncond = encode_prompts(teacher, ["a red circle", "a blue square"])
    shape = latent_shape(teacher, 2)
    x, tau = torch.randn(shape), torch.full((2,), 0.6)
    base = teacher.predict(x, tau, cond).x0
    fake = objective.fake.core(x, tau, cond).x0
    assert torch.allclose(fake, base, atol=1e-6), "the fake adapter starts as the teacher"
    with torch.no_grad():  # move both adapters away from the base, differently
        for g, scale in ((objective.trainable()["student"], 0.5), (objective.trainable()["fake_score"], -0.5)):
            for p in g.parameters():
                p.add_(scale * torch.randn_like(p))
    out_teacher = teacher.predict(x, tau, cond).x0
    out_student = student.denoiser(x, tau, cond).x0
    out_fake = objective.fake.core(x, tau, cond).x0
    assert torch.allclose(out_teacher, base, atol=1e-6), "the teacher view has every adapter off"
    assert (out_student - base).abs().max() > 1e-3 and (out_fake - base).abs().max() > 1e-3
    assert (out_student - out_fake).abs().max() > 1e-3
    assert all(p.requires_grad for g in objective.trainable().values() for p in g.parameters())

    batch = Batch(cond=cond, uncond=uncond, x0=torch.randn(shape))
    for step, phase in ((0, "student"), (1, "fake_score")):
        for g in objective.trainable().values():
            g.zero_grad(set_to_none=True)
        objective.loss(batch, step, phase).loss.backward()
        other = "fake_score" if phase == "student" else "student"
        assert any(p.grad is not None for p in objective.trainable()[phase].parameters())
        assert all(p.grad is None for p in objective.trainable()[other].parameters()), f"{other} got {phase}'s grad"
