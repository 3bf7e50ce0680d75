"""The ``diffusion`` objective: its loss is the textbook one for each prediction type; its sampler is the teacher's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from pydantic import ValidationError

import fewstep.models.backbones  # noqa: F401  (registers the "unet2d" adapter)
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import FlowSchedule, VPSchedule
from fewstep.objectives.diffusion import Diffusion, DiffusionConfig, mix_conditioning, sample_tau
from fewstep.objectives.protocol import OBJECTIVES, Batch
from fewstep.solvers.grids import trailing_vp_grid
from tests.helpers import single_thread  # noqa: F401 (fixture)

NULL_CLASS = 10


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=NULL_CLASS + 1,
    )  # fmt: skip


def vp_schedule() -> VPSchedule:
    return VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))


def make(kind: str = "epsilon", **config) -> tuple[Diffusion, UNet2DModel]:
    unet = tiny_unet()
    schedule = FlowSchedule(timestep_scale=1000.0) if kind == "flow" else vp_schedule()
    null = Conditioning(class_labels=torch.tensor([NULL_CLASS]))
    teacher = Teacher(Denoiser(unet, schedule, kind, "unet2d"), null_cond=null, family="unet2d")
    student = Student.full(teacher)
    return Diffusion(DiffusionConfig(**config), teacher, student), student.denoiser.backbone


def batch(b: int = 6) -> Batch:
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(class_labels=torch.arange(b) % 10)
    return Batch(cond, None, torch.randn(b, 1, 8, 8, generator=gen).clamp(-1, 1))


def test_registered_and_strict_config():
    assert OBJECTIVES.get("diffusion") is Diffusion
    with pytest.raises(ValidationError):
        DiffusionConfig(name="diffusion", cond_dropuot=0.1)
    objective, _ = make()
    assert set(objective.trainable()) == {"student"} and objective.phase(7) == "student"
    assert objective.state_dict() == {}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_loss_is_the_textbook_loss(kind):
    """Same seed, computed by hand with the diffusers UNet: integer VP timesteps, the target of each type."""
    objective, unet = make(kind, cond_dropout=0.0)
    data = batch()
    torch.manual_seed(7)
    loss = objective.loss(data, 0, "student").loss

    torch.manual_seed(7)
    x0, labels, b = data.x0, data.cond.class_labels, data.x0.shape[0]
    if kind == "flow":
        s = torch.rand(b).clamp(1e-4, 1 - 1e-4)
        eps = torch.randn_like(x0)
        x_t = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
        out = unet(x_t, 1000 * s, class_labels=labels).sample
        target = eps - x0  # rectified-flow velocity, diffusers' sign
    else:
        t = torch.randint(0, 1000, (b,))
        eps = torch.randn_like(x0)
        acp = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod[t]
        a, sg = acp.sqrt()[:, None, None, None], (1 - acp).sqrt()[:, None, None, None]
        out = unet(a * x0 + sg * eps, t, class_labels=labels).sample
        target = {"epsilon": eps, "v_prediction": a * eps - sg * x0, "sample": x0}[kind]
    expected = F.mse_loss(out, target)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (float(loss), float(expected))
    loss.backward()
    assert next(unet.parameters()).grad is not None


def test_time_samplers_stay_on_the_vp_grid():
    config = DiffusionConfig(time_sampler="logit_normal")
    tau = sample_tau(vp_schedule(), 4096, config)
    index = tau * 1000 - 1
    assert torch.allclose(index, index.round(), atol=1e-4) and index.min() >= 0 and index.max() <= 999
    assert 0.4 < float(tau.median()) < 0.6  # logit-normal is centred
    flow = sample_tau(FlowSchedule(), 4096, DiffusionConfig())
    assert flow.min() > 0 and flow.max() < 1 and abs(float(flow.mean()) - 0.5) < 0.03


def test_cond_dropout_uses_the_null_class():
    cond = Conditioning(class_labels=torch.arange(6), prompt_embeds=torch.ones(6, 2, 3))
    uncond = Conditioning(class_labels=torch.full((6,), NULL_CLASS), prompt_embeds=torch.zeros(6, 2, 3))
    drop = torch.tensor([True, False, True, False, False, True])
    mixed = mix_conditioning(cond, uncond, drop)
    assert mixed.class_labels.tolist() == [NULL_CLASS, 1, NULL_CLASS, 3, 4, NULL_CLASS]
    assert mixed.prompt_embeds[:, 0, 0].tolist() == [0, 1, 0, 1, 1, 0]

    objective, _ = make(cond_dropout=1.0)
    assert objective.drop_conditioning(cond, None).class_labels.tolist() == [NULL_CLASS] * 6  # teacher.null_cond
    torch.manual_seed(0)
    objective, _ = make(cond_dropout=0.25)
    many = Conditioning(class_labels=torch.zeros(4000, dtype=torch.long))
    dropped = (objective.drop_conditioning(many, None).class_labels == NULL_CLASS).float().mean()
    assert abs(float(dropped) - 0.25) < 0.03


def test_clear_errors():
    objective, _ = make()
    with pytest.raises(ValueError, match="needs `x0`"):
        objective.loss(Batch(Conditioning(class_labels=torch.arange(2))), 0, "student")
    objective.teacher.null_cond = None
    with pytest.raises(ValueError, match="cond_dropout: 0"):
        objective.drop_conditioning(Conditioning(class_labels=torch.arange(2)), None)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampler_is_the_teacher_sampler_on_the_trailing_grid(guidance_scale):
    """A fresh full student is the teacher: its sampler must give the teacher's own DDIM samples."""
    objective, _ = make(sample_guidance_scale=guidance_scale)
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = Conditioning(class_labels=torch.arange(5))
    for steps in (1, 4):
        ours = objective.sampler()(noise, cond, steps)
        theirs = objective.teacher.sample(noise, cond, trailing_vp_grid(steps), guidance_scale=guidance_scale)
        assert torch.allclose(ours, theirs, atol=1e-5), steps
    assert objective.student.training, "sampling must restore train mode"
