"""Guidance distillation: after training on a 2-D class-conditional toy, one forward of the AGD
adapters (or of the classic w-conditioned student) reproduces the two-forward CFG output at several guidance
scales; with the adapters off the base is exactly untouched; the export reloads and composes with a LoRA."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from fewstep.models.agd import load_agd, save_agd
from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student, adapters_disabled
from fewstep.models.teacher import Teacher
from fewstep.objectives.guidance.agd import AGD, AGDConfig
from fewstep.objectives.guidance.guidance_distill import GuidanceDistill, GuidanceDistillConfig
from fewstep.objectives.protocol import Batch
from fewstep.solvers.steps import ddim_step, noise_to
from tests.helpers import (
    NULL_CLASS,
    make_teacher,
    single_thread,  # noqa: F401 (fixture)
)

SCALES = (2.0, 3.5, 5.0)
STEPS = 8


def labelled_mixture(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-Gaussian mixture with 4 classes (two neighbouring Gaussians each)."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * (2 * math.pi / 8)
    x = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + 0.1 * torch.randn(n, 2, generator=generator)
    return x, k // 2


@pytest.fixture(scope="module")
def trained_teacher():
    """A class-conditional flow teacher trained with 20% label dropout (~3 s)."""
    torch.manual_seed(0)
    teacher = make_teacher("flow", num_classes=NULL_CLASS + 1)
    net = teacher.denoiser.backbone.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(500):
        x0, labels = labelled_mixture(512)
        labels = torch.where(torch.rand(512) < 0.2, NULL_CLASS, labels)
        eps, s = torch.randn_like(x0), torch.rand(512)
        out = net((1 - s[:, None]) * x0 + s[:, None] * eps, s, class_labels=labels)
        loss = ((out - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return teacher


@pytest.fixture
def cfg_teacher(trained_teacher):
    """A fresh teacher on a copy of the trained base (adapters and LoRAs attach to it)."""
    d = trained_teacher.denoiser
    return Teacher.from_module(copy.deepcopy(d.backbone), d.schedule, d.prediction_type,
                               null_cond=trained_teacher.null_cond)  # fmt: skip


def batch_of(n: int, generator: torch.Generator | None = None, with_data: bool = False) -> Batch:
    x0, labels = labelled_mixture(n, generator)
    return Batch(cond=Conditioning(class_labels=labels), x0=x0 if with_data else torch.zeros(n, 2))


def train(objective, steps: int, lr: float, with_data: bool = False) -> list[float]:
    params = [p for m in objective.trainable().values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = objective.loss(batch_of(256, with_data=with_data), step, objective.phase(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["loss"])
    return losses


def no_further_students(student, out_dir):
    raise AssertionError("this objective exports no student besides the main one")


def cfg_states(teacher, w: float, n: int = 512, seed: int = 9):
    """States of the base's CFG sampler at guidance ``w`` with the CFG output there (fresh noise)."""
    gen = torch.Generator().manual_seed(seed)
    cond = Conditioning(class_labels=torch.randint(0, NULL_CLASS, (n,), generator=gen))
    x = noise = torch.randn(n, 2, generator=gen)
    taus = torch.linspace(1, 0, STEPS + 1)
    xs, ts, targets = [], [], []
    for i in range(STEPS):
        t = taus[i].expand(n)
        raw = teacher.raw(x, t, cond, guidance_scale=w)
        xs.append(x), ts.append(t), targets.append(raw)
        x = ddim_step(teacher.schedule, teacher.denoiser.to_prediction(raw, x, t), taus[i + 1].expand(n))
    cond_all = Conditioning(class_labels=cond.class_labels.repeat(STEPS))
    return torch.cat(xs), torch.cat(ts), cond_all, torch.cat(targets), (noise, cond, x)


def relative_error(one_forward, x, t, cond, target, teacher) -> float:
    """‖single forward − CFG‖² relative to ‖unguided conditional − CFG‖² (0 = CFG reproduced)."""
    plain = teacher.raw(x, t, cond, guidance_scale=1.0)
    return float(((one_forward.detach() - target) ** 2).mean() / ((plain - target) ** 2).mean())


def test_agd_adapters_reproduce_cfg_in_one_forward_and_leave_the_base_untouched(cfg_teacher, tmp_path):
    base_copy = copy.deepcopy(cfg_teacher.denoiser.backbone)
    config = AGDConfig(w_min=1.0, w_max=6.0, hidden_dim=32, target_modules=r"^net\.(0|2|4|6)$", trajectory_steps=STEPS,
                       record_every=4, buffer_states=8192)  # fmt: skip
    torch.manual_seed(1)
    agd = AGD(config, cfg_teacher, Student.full(cfg_teacher))
    assert agd.student.denoiser.backbone is cfg_teacher.denoiser.backbone  # the frozen base is shared, not copied
    assert not any(p.requires_grad for p in cfg_teacher.denoiser.backbone.parameters())
    x, t, cond, target, _ = cfg_states(cfg_teacher, 3.0)
    agd.adapters.set_guidance(3.0)
    start = agd.student.denoiser.raw(x, t, cond)
    assert torch.equal(start, base_copy(x, t, class_labels=cond.class_labels))  # zero-init out_proj: starts at base

    losses = train(agd, steps=300, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    fraction = agd.extra_parameter_fraction()
    errors = {}
    for w in SCALES:
        x, t, cond, target, end = cfg_states(cfg_teacher, w)
        agd.adapters.set_guidance(w)
        out = agd.student.denoiser.raw(x, t, cond)
        errors[w] = relative_error(out, x, t, cond, target, cfg_teacher)
        with agd.adapters.disabled():  # adapters off: exactly the base
            assert torch.equal(agd.student.denoiser.raw(x, t, cond), base_copy(x, t, class_labels=cond.class_labels))
        noise, cond0, end_cfg = end
        sampler = agd.sampler()
        sampler.guidance_scale = w
        end_plain = cfg_teacher.sample(noise, cond0, torch.linspace(1, 0, STEPS + 1), guidance_scale=1.0)
        end_agd = sampler(noise, cond0, STEPS)  # one forward per step
        errors[f"end{w}"] = float(((end_agd - end_cfg) ** 2).mean() / ((end_plain - end_cfg) ** 2).mean())
    print(f"AGD: extra parameters {fraction:.1%} of the base; relative error vs CFG {errors}")
    assert all(errors[w] < 0.1 for w in SCALES), errors
    assert all(errors[f"end{w}"] < 0.25 for w in SCALES), errors  # 8 one-forward steps land near the CFG endpoints

    # export → load onto a fresh copy of the base, and compose with a LoRA on that base
    save_agd(agd.adapters, tmp_path / "agd")
    fresh = copy.deepcopy(base_copy)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, target_modules=["net.0"], init_lora_weights=False), fresh)
    loaded = load_agd(fresh, tmp_path / "agd")
    loaded.set_guidance(3.0)
    agd.adapters.set_guidance(3.0)
    x, t, cond, _, _ = cfg_states(cfg_teacher, 3.0)
    with adapters_disabled(fresh):  # LoRA off + AGD on: the trained AGD model exactly
        assert torch.equal(fresh(x, t, class_labels=cond.class_labels), agd.student.denoiser.raw(x, t, cond))
    with_lora = fresh(x, t, class_labels=cond.class_labels)
    with loaded.disabled():  # AGD off: the LoRA'd base alone
        lora_only = fresh(x, t, class_labels=cond.class_labels)
    assert not torch.equal(with_lora, lora_only)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_classic_guidance_distillation_matches_cfg_in_one_forward(cfg_teacher, kind):
    torch.manual_seed(2)
    student = Student.full(cfg_teacher) if kind == "full" else Student.lora(cfg_teacher, rank=16)
    objective = GuidanceDistill(GuidanceDistillConfig(w_min=1.0, w_max=6.0, embed_target="net.0"), cfg_teacher, student)
    losses = train(objective, steps=250, lr=3e-3, with_data=True)
    assert all(math.isfinite(v) for v in losses)
    errors = {}
    gen = torch.Generator().manual_seed(4)
    x0, labels = labelled_mixture(1024, gen)
    cond = Conditioning(class_labels=labels)
    t = torch.rand(1024, generator=gen).clamp(1e-3, 1 - 1e-3)
    x = noise_to(cfg_teacher.schedule, x0, torch.randn(1024, 2, generator=gen), t)
    for w in SCALES:
        target = cfg_teacher.raw(x, t, cond, guidance_scale=w)
        out = student.denoiser.raw(x, t, objective.student_cond(cond, w, 1024))
        errors[w] = relative_error(out, x, t, cond, target, cfg_teacher)
    print(f"classic ({kind}): relative error vs CFG {errors}")
    assert all(e < 0.15 for e in errors.values()), errors
    if kind == "lora":  # the teacher view (LoRA and w-embedding off) is the untouched base
        plain = cfg_teacher.raw(x, t, cond, guidance_scale=1.0)
        with cfg_teacher.view():
            assert torch.equal(plain, cfg_teacher.denoiser.raw(x, t, cond).float())


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_agd_export_loads_into_a_diffusers_pipeline_and_composes_with_a_lora(family, tmp_path):
    """AGD on a tiny real model: adapters on every attn2 (SDXL) / joint attn (SD3); the export attaches to a freshly
    loaded pipeline's backbone, reproduces the trained forward exactly, runs the pipeline at guidance_scale=1, and a
    peft LoRA on the same backbone composes (adapters off = the LoRA'd base exactly)."""
    from types import SimpleNamespace

    from peft import LoraConfig

    from fewstep.models.backbones import latent_shape
    from fewstep.models.denoiser import Denoiser
    from fewstep.models.loading import load_teacher
    from fewstep.models.prompts import encode_prompts
    from fewstep.testing import load_tiny_pipeline

    teacher = load_teacher(SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32",
                                           guidance_scale=5.0, revision=None, variant=None))  # fmt: skip
    agd = AGD(AGDConfig(hidden_dim=16), teacher, Student.full(teacher))
    names = set(agd.adapters.specs)
    expected = r"attn2$" if family == "sdxl" else r"^transformer_blocks\.\d+\.attn$"
    assert names and all(re.search(expected, n) for n in names)
    print(f"AGD on tiny {family}: {len(names)} adapters, extra parameters {agd.extra_parameter_fraction():.1%}")
    torch.manual_seed(0)
    for adapter in agd.adapters.adapters.values():  # stand-in for training: non-zero residuals
        torch.nn.init.normal_(adapter.out_proj.weight, std=0.05)
    agd.export_extra(tmp_path, no_further_students)

    pipe = load_tiny_pipeline(family)
    backbone = pipe.unet if family == "sdxl" else pipe.transformer
    pipe.set_progress_bar_config(disable=True)
    loaded = load_agd(backbone, tmp_path)
    loaded.set_guidance(4.0)
    agd.adapters.set_guidance(4.0)
    cond, _ = encode_prompts(teacher, ["a red circle"])
    x = torch.randn(latent_shape(teacher, 1))

    fresh = Denoiser(backbone, teacher.schedule, teacher.denoiser.prediction_type, teacher.denoiser.adapter_name)
    tau = torch.tensor([0.5])
    trained = agd.student.denoiser.raw(x, tau, cond)
    assert torch.allclose(fresh.raw(x, tau, cond), trained, atol=1e-5)
    with loaded.disabled():
        base = fresh.raw(x, tau, cond)
    assert not torch.allclose(base, trained, atol=1e-4)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert torch.isfinite(image).all()

    backbone.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with_both = fresh.raw(x, tau, cond)
    with loaded.disabled():
        lora_only = fresh.raw(x, tau, cond)
    assert not torch.allclose(with_both, lora_only, atol=1e-4)
    with adapters_disabled(backbone):
        assert torch.allclose(fresh.raw(x, tau, cond), trained, atol=1e-5)  # LoRA off: the AGD model again


def test_agd_on_a_class_conditional_unet_attends_to_a_class_token(tmp_path):
    """On the shipped class-conditional UNet2DModel (digits) the adapters get a class token (AGD's DiT adapters):
    the residual depends on the label through it, a training step reaches its embedding, the jittered recording
    visits levels off the fixed grid, and the export reloads onto a fresh UNet with the same outputs."""
    from types import SimpleNamespace

    from diffusers import UNet2DModel

    from fewstep.assets import asset_path
    from fewstep.models.denoiser import Denoiser
    from fewstep.models.loading import load_teacher
    from fewstep.solvers.grids import sampling_taus

    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-flow", family="auto", dtype="float32",
                                           guidance_scale=2.0, revision=None, variant=None))  # fmt: skip
    config = AGDConfig(w_min=1.0, w_max=4.0, hidden_dim=16, target_modules=r".*attentions\.\d+$", trajectory_steps=4,
                       record_every=1, buffer_states=64)  # fmt: skip
    torch.manual_seed(0)
    agd = AGD(config, teacher, Student.full(teacher))
    classes = teacher.denoiser.backbone.config.num_class_embeds
    assert agd.adapters.class_embed.num_embeddings == classes
    for adapter in agd.adapters.adapters.values():  # stand-in for training: non-zero residuals
        torch.nn.init.normal_(adapter.out_proj.weight, std=0.05)
    x, tau = torch.randn(2, 1, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.6)
    cond = Conditioning(class_labels=torch.tensor([3, 7]))
    agd.adapters.set_guidance(2.0)
    with agd.adapters.disabled():
        base = teacher.denoiser.raw(x, tau, cond)
    residual = agd.student.denoiser.raw(x, tau, cond) - base
    with torch.no_grad():
        agd.adapters.class_embed.weight[3] += 1.0  # only label 3's token changes
    moved = agd.student.denoiser.raw(x, tau, cond) - base
    assert not torch.allclose(moved[0], residual[0], atol=1e-5) and torch.allclose(moved[1], residual[1], atol=1e-6)

    batch = Batch(cond=Conditioning(class_labels=torch.arange(8)), x0=torch.zeros(8, 1, 8, 8))
    out = agd.loss(batch, 0, agd.phase(0))
    out.loss.backward()
    assert agd.adapters.class_embed.weight.grad[:8].abs().sum() > 0
    recorded = set(torch.cat([c[1] for c in agd.buffer.chunks]).tolist())
    fixed = set(sampling_taus(teacher.schedule, 4).tolist())
    for step in range(1, 6):
        agd.loss(batch, step, agd.phase(step))
        recorded |= set(torch.cat([c[1] for c in agd.buffer.chunks]).tolist())
    assert len(recorded - fixed) >= 6  # the grid moves between recordings (level_jitter)

    agd.export_extra(tmp_path, no_further_students)
    unet = UNet2DModel.from_pretrained(asset_path("digits-flow") / "unet")
    loaded = load_agd(unet, tmp_path)
    loaded.set_guidance(2.0)
    agd.adapters.set_guidance(2.0)
    fresh = Denoiser(unet, teacher.schedule, teacher.denoiser.prediction_type, teacher.denoiser.adapter_name)
    assert torch.allclose(fresh.raw(x, tau, cond), agd.student.denoiser.raw(x, tau, cond), atol=1e-5)
