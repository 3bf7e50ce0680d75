"""Gradient checkpointing recomputes each block in the state of its forward. DMD2 with LoRA roles on one base
switches adapters between forwards and freezes the fake score around the generator's GAN forward; the checkpointed run
must end with exactly the weights of the run that keeps its activations."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fewstep.config import validate_recipe
from fewstep.config.schema import StudentConfig
from fewstep.models.backbones import latent_shape
from fewstep.models.loading import load_teacher
from fewstep.plan.inputs import wan_conditioning
from fewstep.train.build import build_student
from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from fewstep.train.loop import train


def dmd2_recipe(output_dir, checkpointing: bool):
    return validate_recipe({
        "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4, "alpha": 4}, "gradient_checkpointing": checkpointing},
        "objective": {
            "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
            "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 0,
        },
        "data": {"source": "digits", "batch_size": 4},
        "optim": {"lr": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0},
        "train": {"max_steps": 3, "checkpoint_every": 3, "sample_every": None, "progress": False},
        "output_dir": str(output_dir),
    })  # fmt: skip


def test_checkpointed_dmd2_with_lora_roles_and_gan_equals_the_plain_run(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(dmd2_recipe(plain, checkpointing=False))
    train(dmd2_recipe(checkpointed, checkpointing=True))
    a, b = load_trainable_weights(checkpoint_dir(plain, 3)), load_trainable_weights(checkpoint_dir(checkpointed, 3))
    assert sorted(a) == sorted(b) == ["fake_score", "student"]
    for group in a:
        assert sorted(a[group]) == sorted(b[group])
        assert all(float((a[group][k] - b[group][k]).abs().max()) < 1e-6 for k in a[group]), group
    assert any(float(t.abs().max()) > 0 for k, t in a["fake_score"].items() if "lora_B" in k)  # the fake score trained


def wan22_lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one student forward on the tiny Wan 2.2 (two experts), a batch with one sample for each
    expert, with or without gradient checkpointing (``student.gradient_checkpointing``)."""
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan22"))
    student = build_student(StudentConfig(kind="lora", lora={"rank": 2}, gradient_checkpointing=checkpointing), teacher)
    backbone = student.denoiser.backbone
    tau = torch.tensor([0.99, 0.05])
    high = teacher.schedule.model_timestep(tau) >= backbone.boundary_timestep
    assert high.tolist() == [True, False]  # one sample per expert
    torch.manual_seed(0)
    x = torch.randn(latent_shape(teacher, 2))
    cond = wan_conditioning(backbone.high, teacher, tuple(x.shape), 8, "cpu", torch.float32)
    for p in student.parameters():  # lora_B starts at zero: give the adapters an output to differentiate
        if p.requires_grad:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    student.denoiser.raw(x, tau, cond).square().mean().backward()
    assert all(e.is_gradient_checkpointing == checkpointing for e in (backbone.high, backbone.low))
    return {k: p.grad.clone() for k, p in student.named_parameters() if p.requires_grad}


def test_wan22_experts_checkpoint_both_and_match_the_plain_gradients():
    """Wan 2.2's ``WanExperts`` takes ``gradient_checkpointing`` (the shipped A14B recipe sets it): both experts
    checkpoint their blocks, and the gradients equal those of the run that keeps its activations."""
    plain, checkpointed = wan22_lora_grads(False), wan22_lora_grads(True)
    assert sorted(plain) == sorted(checkpointed)
    assert {k.split(".")[2] for k in plain if ".backbone." in k} >= {"high", "low"}
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], atol=1e-6), k
    assert all(float(g.abs().max()) > 0 for k, g in plain.items() if "lora_A" in k)
