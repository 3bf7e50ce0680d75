from types import SimpleNamespace

import pytest
import torch

from fewstep.models.backbones import latent_shape
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import Student


def _teacher(family: str, guidance_scale: float = 3.0):
    cfg = SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32", guidance_scale=guidance_scale,
                          revision=None, variant=None)  # fmt: skip
    return load_teacher(cfg)


def _inputs(teacher, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(latent_shape(teacher, 2), generator=gen)
    tau = torch.tensor([0.9, 0.4])
    kwargs = {"max_sequence_length": 16} if teacher.family in ("sd3", "flux") else {}
    cond, uncond = encode_prompts(teacher, ["a photo of a cat", "a red car"], **kwargs)
    return x, tau, cond, uncond


def _base_ptrs(module: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for n, p in module.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_lora_student_shares_the_base_and_leaves_the_teacher_alone(family):
    teacher = _teacher(family)
    x, tau, cond, uncond = _inputs(teacher)
    before = teacher.raw(x, tau, cond, uncond)
    ptrs = _base_ptrs(teacher.denoiser.backbone)

    student = Student.lora(teacher, rank=4)
    backbone = student.denoiser.backbone
    assert backbone is teacher.denoiser.backbone
    assert _base_ptrs(backbone) == ptrs, "the LoRA student must not hold a second copy of the base"
    lora = [p for n, p in backbone.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if "lora_" not in n)
    # Gaussian init has lora_B = 0: the student starts as the teacher.
    torch.testing.assert_close(
        student.denoiser.raw(x, tau, cond).float(), teacher.raw(x, tau, cond, guidance_scale=1.0)
    )

    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    assert torch.equal(teacher.raw(x, tau, cond, uncond), before), "teacher.view must disable the adapters"
    with torch.no_grad():
        changed = student.denoiser.raw(x, tau, cond).float()
    assert (changed - teacher.raw(x, tau, cond, guidance_scale=1.0)).abs().max() > 1e-3
    assert torch.equal(teacher.raw(x, tau, cond, uncond), before), "adapters are re-enabled only for the student"


def test_full_student_is_an_independent_copy():
    teacher = _teacher("sd15")
    x, tau, cond, _ = _inputs(teacher)
    student = Student.full(teacher)
    assert not (_base_ptrs(student.denoiser.backbone) & _base_ptrs(teacher.denoiser.backbone))
    assert all(p.requires_grad for p in student.denoiser.backbone.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student.denoiser.raw(x, tau, cond), teacher.raw(x, tau, cond, guidance_scale=1.0))
        before = teacher.raw(x, tau, cond, guidance_scale=1.0)
        for p in student.denoiser.backbone.parameters():
            p.add_(0.01)
    assert torch.equal(teacher.raw(x, tau, cond, guidance_scale=1.0), before)
    assert student.denoiser.schedule is teacher.schedule


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_cfg_off_is_the_conditional_output(family):
    teacher = _teacher(family)
    x, tau, cond, uncond = _inputs(teacher)
    with torch.no_grad():
        assert torch.equal(teacher.raw(x, tau, cond, uncond, guidance_scale=1.0), teacher.denoiser.raw(x, tau, cond))
    guided = teacher.raw(x, tau, cond, uncond, guidance_scale=3.0)
    assert (guided - teacher.raw(x, tau, cond, uncond, guidance_scale=1.0)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_cfg_is_the_same_on_raw_outputs_and_on_x0_eps(family):
    # The conversions are affine with the same coefficients for both branches (linearity of CFG).
    teacher = _teacher(family)
    x, tau, cond, uncond = _inputs(teacher)
    w = 3.0
    guided = teacher.predict(x, tau, cond, uncond, guidance_scale=w)
    with torch.no_grad():
        pc, pu = teacher.denoiser(x, tau, cond), teacher.denoiser(x, tau, uncond)
    x0 = pu.x0 + w * (pc.x0 - pu.x0)
    eps = pu.eps + w * (pc.eps - pu.eps)
    scale = max(1.0, float(x0.abs().max()))
    torch.testing.assert_close(guided.x0, x0, atol=2e-6 * scale, rtol=0)
    torch.testing.assert_close(guided.eps, eps, atol=2e-6 * scale, rtol=0)
    # Per-sample guidance scales: each row uses its own w.
    per_sample = teacher.raw(x, tau, cond, uncond, guidance_scale=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per_sample[0], teacher.raw(x, tau, cond, uncond, guidance_scale=1.0)[0])
    torch.testing.assert_close(per_sample[1], teacher.raw(x, tau, cond, uncond, guidance_scale=3.0)[1])


def test_uncond_like_uses_the_null_prompt():
    teacher = _teacher("sdxl")
    x, tau, cond, uncond = _inputs(teacher)
    null = teacher.uncond_like(cond)
    assert torch.equal(null.prompt_embeds, uncond.prompt_embeds)
    assert torch.equal(null.time_ids, cond.time_ids)
    torch.testing.assert_close(teacher.raw(x, tau, cond), teacher.raw(x, tau, cond, uncond))


def test_teacher_view_keeps_a_second_adapter_trainable():
    """Two trainable adapters on one base (DMD's student and fake score): the teacher's view bypasses both and
    leaves every adapter's requires_grad as it was (peft's enable_adapters re-enables only the active one)."""
    from fewstep.objectives.dmd.roles import add_adapter

    teacher = _teacher("sd15")
    x, tau, cond, uncond = _inputs(teacher)
    before = teacher.raw(x, tau, cond, uncond)
    student = Student.lora(teacher, rank=4)
    backbone = student.denoiser.backbone
    add_adapter(backbone, student.lora_config, "fake")
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    grads = {n: p.requires_grad for n, p in backbone.named_parameters() if "lora_" in n}
    assert any(".fake." in n for n in grads) and all(grads.values())

    assert torch.equal(teacher.raw(x, tau, cond, uncond), before), "the view must bypass both adapters"
    after = {n: p.requires_grad for n, p in backbone.named_parameters() if "lora_" in n}
    assert after == grads, [n for n in grads if after[n] != grads[n]][:3]
    with torch.no_grad():
        assert (
            student.denoiser.raw(x, tau, cond).float() - teacher.raw(x, tau, cond, guidance_scale=1.0)
        ).abs().max() > 1e-3


def test_teacher_views_compose_in_the_order_they_were_added():
    """Every teacher forward runs inside all views (entered in order, left in reverse), also when one raises."""
    import contextlib

    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp"))
    events = []

    def view(name):
        @contextlib.contextmanager
        def ctx():
            events.append(f"enter {name}")
            try:
                yield
            finally:
                events.append(f"exit {name}")

        return ctx

    x, tau = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.9])
    cond = Conditioning(class_labels=torch.tensor([1, 2]))
    plain = teacher.raw(x, tau, cond, guidance_scale=1.0)
    teacher.add_view(view("a"))
    teacher.add_view(view("b"))
    assert torch.equal(teacher.raw(x, tau, cond, guidance_scale=1.0), plain)
    assert events == ["enter a", "enter b", "exit b", "exit a"]
    events.clear()
    with pytest.raises(RuntimeError, match="inside"), teacher.view():
        assert events == ["enter a", "enter b"]
        raise RuntimeError("inside")
    assert events == ["enter a", "enter b", "exit b", "exit a"]
