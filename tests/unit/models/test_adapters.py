"""Adapter bookkeeping of LoRA students: the cached ``tuner_layers``, ``Student.sampling()`` (eval mode once, the
adapter merged into the base and restored bit for bit) and ``eval_mode`` on models already in eval mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fewstep.models.backbones import latent_shape
from fewstep.models.denoiser import eval_mode, in_mode
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.student import (
    Student,
    adapter_switched,
    adapters_disabled,
    forget_tuner_layers,
    tuner_layers,
)
from fewstep.objectives.consistency.lcm import LCM, LCMConfig
from fewstep.objectives.dmd.roles import add_adapter


def _lora_student(seed: int = 0) -> tuple[object, Student]:
    cfg = SimpleNamespace(pretrained="tiny:sd15", family="auto", dtype="float32", guidance_scale=1.0, revision=None,
                          variant=None)  # fmt: skip
    teacher = load_teacher(cfg)
    student = Student.lora(teacher, rank=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would make merging a no-op: give the adapter a visible effect
        for name, p in student.denoiser.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return teacher, student


def _walk(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_tuner_layers_are_cached_and_rebuilt_when_an_adapter_is_added():
    _, student = _lora_student()
    backbone = student.denoiser.backbone
    layers = tuner_layers(backbone)
    assert list(layers) == _walk(backbone) and len(layers) > 10
    assert tuner_layers(backbone) is layers, "the second call must not walk the network again"

    config = LoraConfig(r=2, lora_alpha=2, target_modules=student.lora_config.target_modules)
    add_adapter(backbone, config, "fake")
    rebuilt = tuner_layers(backbone)
    assert rebuilt is not layers and list(rebuilt) == _walk(backbone)
    assert all({"default", "fake"} <= set(layer.lora_A) for layer in rebuilt)
    assert all(layer.active_adapters == ["default"] for layer in rebuilt)

    forget_tuner_layers(backbone)
    assert tuner_layers(backbone) is not rebuilt and list(tuner_layers(backbone)) == list(rebuilt)
    assert tuner_layers(nn.Linear(2, 2)) == ()


def test_adapters_disabled_uses_the_cached_layers():
    teacher, student = _lora_student()
    backbone = student.denoiser.backbone
    with adapters_disabled(backbone):
        assert all(layer.disable_adapters for layer in _walk(backbone))
    assert not any(layer.disable_adapters for layer in _walk(backbone))


@pytest.mark.parametrize("num_steps", [1, 4])
def test_sampling_merges_the_adapter_and_restores_everything(num_steps):
    teacher, student = _lora_student()
    backbone = student.denoiser.backbone
    sampler = LCM(LCMConfig(w_min=0.0, w_max=0.0, ema_target=False), teacher, student).sampler()
    noise = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(0))
    cond, _ = encode_prompts(teacher, ["a photo of a cat", "a red car"])
    before = _weights(backbone)
    reference = sampler(noise, cond, num_steps, torch.Generator().manual_seed(1))

    with student.sampling() as same:
        assert same is student and not any(m.training for m in student.modules())
        assert all(layer.merged for layer in tuner_layers(backbone))
        fused = sampler(noise, cond, num_steps, torch.Generator().manual_seed(1))

    # The random tiny UNet's x̂0 reach |x| ≈ 60, where float32 rounding of W·x + B·A·x vs (W + BA)·x shows up at
    # ~1e-5 absolute (a few ulps): the bound is 1e-5 relative to the samples' scale.
    scale = float(reference.abs().max())
    assert scale > 1.0
    assert float((fused - reference).abs().max()) <= 1e-5 * scale
    assert not any(layer.merged for layer in tuner_layers(backbone))
    assert all(m.training for m in student.modules()), "the student was training before: it is again"
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights must be bit-identical after the block"
    assert torch.equal(sampler(noise, cond, num_steps, torch.Generator().manual_seed(1)), reference)


def test_sampling_keeps_the_teacher_correct_and_restores_mixed_modes():
    teacher, student = _lora_student()
    backbone = student.denoiser.backbone
    x = torch.randn(latent_shape(teacher, 2), generator=torch.Generator().manual_seed(2))
    tau = torch.tensor([0.9, 0.4])
    cond, _ = encode_prompts(teacher, ["a photo of a cat", "a red car"])
    teacher_ref = teacher.raw(x, tau, cond, guidance_scale=1.0)
    before = _weights(backbone)
    backbone.mid_block.eval()  # a mixed state: restored module by module, not forced to one mode
    modes = [m.training for m in student.modules()]

    with student.sampling():
        inside = teacher.raw(x, tau, cond, guidance_scale=1.0)  # peft unmerges the layers the teacher runs through
        assert (inside - teacher_ref).abs().max() <= 1e-5 * max(1.0, float(teacher_ref.abs().max()))

    assert [m.training for m in student.modules()] == modes
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for layer in tuner_layers(backbone))


def test_sampling_without_a_weight_copy_unmerges_to_float_precision():
    _, student = _lora_student()
    backbone = student.denoiser.backbone
    before = _weights(backbone)
    with student.sampling(exact_restore=False):
        assert all(layer.merged for layer in tuner_layers(backbone))
    after = backbone.state_dict()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) <= 1e-6
    assert not any(layer.merged for layer in tuner_layers(backbone))


def test_full_student_sampling_is_eval_mode_only():
    cfg = SimpleNamespace(pretrained="tiny:sd15", family="auto", dtype="float32", guidance_scale=1.0, revision=None,
                          variant=None)  # fmt: skip
    student = Student.full(load_teacher(cfg))
    before = _weights(student)
    with student.sampling():
        assert not any(m.training for m in student.modules())
    assert all(m.training for m in student.modules())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


class _CountingTrain(nn.Linear):
    calls = 0

    def train(self, mode: bool = True) -> _CountingTrain:
        type(self).calls += 1
        return super().train(mode)


def test_eval_mode_switches_nothing_on_a_model_already_in_eval_mode():
    _, student = _lora_student()
    denoiser = student.denoiser
    denoiser.eval()
    assert in_mode(denoiser, False) and not in_mode(denoiser, True)
    with eval_mode(denoiser):
        assert not any(m.training for m in denoiser.modules())
    assert not any(m.training for m in denoiser.modules())

    # mixed: the root in eval mode, one submodule training -> all eval inside and after (nn.Module semantics)
    denoiser.backbone.mid_block.train()
    assert not in_mode(denoiser, False)
    with eval_mode(denoiser):
        assert not any(m.training for m in denoiser.modules())
    assert not any(m.training for m in denoiser.modules())

    # a training model switches and comes back
    denoiser.train()
    with eval_mode(denoiser):
        assert not any(m.training for m in denoiser.modules())
    assert all(m.training for m in denoiser.modules())

    # a submodule with its own `train` is always called, even when no flag would change
    model = nn.Sequential(nn.Linear(2, 2), _CountingTrain(2, 2)).eval()
    calls = _CountingTrain.calls
    assert not in_mode(model, False)
    with eval_mode(model):
        pass
    assert _CountingTrain.calls > calls


def test_adapter_switched_sets_only_the_active_adapter_and_restores_it():
    _, student = _lora_student()
    backbone = student.denoiser.backbone
    config = LoraConfig(r=2, lora_alpha=2, target_modules=student.lora_config.target_modules)
    add_adapter(backbone, config, "fake")
    grads = {k: p.requires_grad for k, p in backbone.named_parameters()}
    with adapter_switched(backbone, "fake"):
        assert all(layer.active_adapters == ["fake"] for layer in _walk(backbone))
        with pytest.raises(RuntimeError):
            with adapter_switched(backbone, "default"):
                assert all(layer.active_adapters == ["default"] for layer in _walk(backbone))
                raise RuntimeError("restored even on error")
        assert all(layer.active_adapters == ["fake"] for layer in _walk(backbone))
    assert all(layer.active_adapters == ["default"] for layer in _walk(backbone))
    assert grads == {k: p.requires_grad for k, p in backbone.named_parameters()}, "requires_grad is not touched"
