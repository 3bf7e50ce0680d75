"""Reflow: pair generation is exact and resumable; on a 2-D mixture 2-RF straightens the teacher's
flow and cuts its 1-step error; InstaFlow's one-step student and a smaller SlimFlow student beat the teacher at 1 step.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config.schema import DataConfig
from fewstep.data.loader import build_batches
from fewstep.data.reflow import PairDataset, generate_pairs, straightness
from fewstep.data.reflow.generate import class_conditions
from fewstep.data.reflow.pairs import MANIFEST, shard_name
from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student, num_parameters
from fewstep.models.teacher import Teacher
from fewstep.noise.timesteps import u_shaped
from fewstep.objectives.losses import lpips_distance, pseudo_huber_distance
from fewstep.objectives.protocol import OBJECTIVES
from fewstep.objectives.reflow.instaflow import InstaFlow, InstaFlowConfig
from fewstep.objectives.reflow.reflow import Reflow, ReflowConfig
from fewstep.solvers.grids import linspace_grid
from tests.helpers import (
    ToyNet,
    make_teacher,
    mixture,
    single_thread,  # noqa: F401 (fixture)
    sliced_wasserstein,
    train_teacher,
)

TEACHER_STEPS = 30


# --- pair generation ---------------------------------------------------------------------------------------------


class Interrupt(RuntimeError):
    pass


def read_all(path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = json.loads((path / MANIFEST).read_text())
    shards = {s["file"]: load_file(str(path / s["file"])) for s in manifest["shards"]}
    return manifest, shards


@pytest.fixture(scope="module")
def cond_teacher() -> Teacher:
    torch.manual_seed(0)
    return make_teacher("flow", num_classes=5)  # class 4 is the null class


def make_pairs(teacher, path, accelerator=None, conditions=None, num_pairs=23):
    return generate_pairs(
        teacher, path, (2,), num_pairs, linspace_grid(4), conditions or class_conditions(teacher), guidance_scale=2.0,
        shard_size=5, batch_size=3, seed=7, accelerator=accelerator, progress=False,
    )  # fmt: skip


def test_pairs_are_exact_and_resume_after_interrupt_without_loss_or_duplicates(cond_teacher, tmp_path):
    reference = make_pairs(cond_teacher, tmp_path / "ref")
    manifest, shards = read_all(reference)
    assert manifest["complete"] and [s["num_pairs"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]

    # the stored sample is the teacher's CFG ODE solution of the stored noise for the stored class, exactly when
    # solved in the same batches of 3 (BLAS kernels may round differently for another batch size)
    data = shards[shard_name(1)]
    labels, noise = data["cond.class_labels"], data["noise"]
    again = torch.cat([
        cond_teacher.sample(noise[i : i + 3], Conditioning(class_labels=labels[i : i + 3]), linspace_grid(4),
                            guidance_scale=2.0)
        for i in range(0, len(noise), 3)
    ])  # fmt: skip
    assert torch.equal(again, data["sample"])
    assert set(data["cond.class_labels"].tolist()) <= {0, 1, 2, 3}

    # killed after two shards, then resumed: the same bytes, no shard written twice
    calls = {"n": 0}
    base = class_conditions(cond_teacher)

    def dying(index, n, gen):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Interrupt("killed")
        return base(index, n, gen)

    with pytest.raises(Interrupt):
        make_pairs(cond_teacher, tmp_path / "resumed", conditions=dying)
    assert not json.loads((tmp_path / "resumed" / MANIFEST).read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        PairDataset(tmp_path / "resumed")
    written = []
    counting = lambda index, n, gen: (written.append(index), base(index, n, gen))[1]  # noqa: E731
    make_pairs(cond_teacher, tmp_path / "resumed", conditions=counting)
    assert written == [2, 3, 4]
    manifest2, shards2 = read_all(tmp_path / "resumed")
    assert manifest2 == manifest
    for name, tensors in shards.items():
        assert tensors.keys() == shards2[name].keys()
        assert all(torch.equal(tensors[k], shards2[name][k]) for k in tensors), name

    # two ranks, each writing its own shards (rank 1 first), give the same set
    for rank in (1, 0):
        acc = SimpleNamespace(process_index=rank, num_processes=2, device="cpu", wait_for_everyone=lambda: None)
        make_pairs(cond_teacher, tmp_path / "ranks", accelerator=acc)
    manifest3, shards3 = read_all(tmp_path / "ranks")
    assert manifest3 == manifest
    assert all(torch.equal(shards[n][k], shards3[n][k]) for n in shards for k in shards[n])

    # other settings in the same directory are refused
    with pytest.raises(ValueError, match="other settings"):
        make_pairs(cond_teacher, tmp_path / "ref", num_pairs=30)


def test_pairs_data_source_gives_noise_sample_and_condition(cond_teacher, tmp_path):
    path = make_pairs(cond_teacher, tmp_path / "pairs")
    stream = build_batches(DataConfig(source="pairs", path=str(path), batch_size=4, shuffle=False), cond_teacher)
    batch = next(stream)
    noise, sample, cond = PairDataset(path).batch([0, 1, 2, 3])
    shard0, shard1 = load_file(str(path / shard_name(0))), load_file(str(path / shard_name(1)))
    assert torch.equal(noise, shard0["noise"][:4]) and torch.equal(sample, shard0["sample"][:4])
    noise2, _, cond2 = PairDataset(path).batch([7, 2])  # across shards, in the order asked
    assert torch.equal(noise2, torch.stack([shard1["noise"][2], shard0["noise"][2]]))
    assert cond2.class_labels.tolist() == [int(shard1["cond.class_labels"][2]), int(shard0["cond.class_labels"][2])]
    assert torch.equal(batch.extra["noise"], noise) and torch.equal(batch.x0, sample)
    assert torch.equal(batch.cond.class_labels, cond.class_labels)
    assert batch.uncond.class_labels.tolist() == [4, 4, 4, 4]


# --- rfpp pieces ---------------------------------------------------------------------------------------------------


def test_rfpp_pseudo_huber_and_u_shaped_time():
    a, b = torch.zeros(3, 4, 8, 8), torch.ones(3, 4, 8, 8)
    d = 256
    c = 0.00054 * d
    assert torch.allclose(pseudo_huber_distance(a, b), torch.full((3,), (math.sqrt(d + c**2) - c) / d))
    tau = u_shaped(200_000, torch.Generator().manual_seed(0), a=4.0)
    edges = ((tau < 0.1) | (tau > 0.9)).float().mean().item()
    middle = ((tau > 0.45) & (tau < 0.55)).float().mean().item()
    cdf = lambda t: (math.sinh(4 * (t - 0.5)) + math.sinh(2)) / (2 * math.sinh(2))  # noqa: E731  ∝ cosh(4(τ − ½))
    assert edges == pytest.approx(2 * cdf(0.1), abs=0.005) and middle == pytest.approx(cdf(0.55) - cdf(0.45), abs=0.003)
    assert edges > 1.7 * 0.2 and middle < 0.6 * 0.1  # vs uniform: mass at the ends, little in the middle
    assert OBJECTIVES.get("reflow") is Reflow and OBJECTIVES.get("instaflow") is InstaFlow


def test_lpips_huber_without_local_weights_is_a_clear_error():
    teacher = make_teacher("flow")
    with pytest.raises(ValueError, match="lpips_weights"):
        Reflow(ReflowConfig(loss_type="lpips_huber"), teacher, Student.full(teacher))
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        Reflow(ReflowConfig(loss_type="lpips_huber", lpips_weights="/nonexistent/lpips.pt"), teacher,
               Student.full(teacher))  # fmt: skip


# --- the 2-D toy ---------------------------------------------------------------------------------------------------


def fit(objective, path, steps: int, lr: float = 1e-3, batch_size: int = 256) -> list[float]:
    stream = build_batches(DataConfig(source="pairs", path=str(path), batch_size=batch_size), objective.teacher)
    params = [p for p in objective.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = objective.loss(next(stream), step, "student")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["loss"])
    return losses


def as_teacher(student: Student) -> Teacher:
    d = student.denoiser
    return Teacher.from_module(d.backbone, d.schedule, d.prediction_type)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A flow teacher on the 8-Gaussian mixture, its pairs, and a 2-RF student trained on them."""
    teacher = train_teacher("flow", steps=600)
    root = tmp_path_factory.mktemp("reflow")
    pairs = generate_pairs(teacher, root / "pairs", (2,), 4096, linspace_grid(TEACHER_STEPS), shard_size=2048,
                           batch_size=2048, progress=False)  # fmt: skip
    torch.manual_seed(1)
    reflow = Reflow(ReflowConfig(), teacher, Student.full(teacher))
    losses = fit(reflow, pairs, steps=300)
    assert all(math.isfinite(v) for v in losses)
    return SimpleNamespace(teacher=teacher, pairs=pairs, root=root, reflow=reflow, losses=losses)


def evaluate(predict_teacher, predict_student, schedule, noise):
    s_t, end_t = straightness(predict_teacher, schedule, noise, linspace_grid(100))
    s_s, _ = straightness(predict_student, schedule, noise, linspace_grid(100))
    return s_t, s_s, end_t


def test_toy_reflow_straightens_the_flow_and_cuts_the_one_step_error(toy):
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    cond = Conditioning()
    student = toy.reflow.student.denoiser.eval()
    s_teacher, s_student, end = evaluate(
        lambda x, t: toy.teacher.predict(x, t, cond), lambda x, t: student(x, t, cond), toy.teacher.schedule, noise
    )
    teacher_1 = toy.teacher.sample(noise, cond, linspace_grid(1))
    student_1 = toy.reflow.sampler()(noise, cond, 1)
    err_teacher = ((teacher_1 - end) ** 2).mean().item()
    err_student = ((student_1 - end) ** 2).mean().item()
    print(f"straightness teacher {s_teacher:.4f} 2-RF {s_student:.4f}; 1-step error vs teacher ODE: teacher "
          f"{err_teacher:.4f} 2-RF {err_student:.4f}")  # fmt: skip
    assert s_student < 0.35 * s_teacher
    assert err_student < 0.35 * err_teacher
    real = mixture(2000, torch.Generator().manual_seed(2))
    assert sliced_wasserstein(student_1, real) < sliced_wasserstein(teacher_1, real)
    two = toy.reflow.sampler()(noise, cond, 2)
    assert sliced_wasserstein(two, real) < sliced_wasserstein(teacher_1, real)


def test_toy_instaflow_one_step_student_beats_the_teacher_at_one_step(toy):
    two_rf = as_teacher(toy.reflow.student)
    pairs = generate_pairs(two_rf, toy.root / "pairs_2rf", (2,), 4096, linspace_grid(TEACHER_STEPS), shard_size=4096,
                           batch_size=4096, progress=False)  # fmt: skip
    torch.manual_seed(2)
    insta = InstaFlow(InstaFlowConfig(), two_rf, Student.full(two_rf))
    fit(insta, pairs, steps=150, lr=5e-4)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    real = mixture(2000, torch.Generator().manual_seed(2))
    cond = Conditioning()
    sw_teacher = sliced_wasserstein(toy.teacher.sample(noise, cond, linspace_grid(1)), real)
    sw_2rf = sliced_wasserstein(two_rf.sample(noise, cond, linspace_grid(1)), real)
    sw_insta = sliced_wasserstein(insta.sampler()(noise, cond, 1), real)
    print(f"1-step SW: teacher {sw_teacher:.3f} 2-RF {sw_2rf:.3f} InstaFlow {sw_insta:.3f}")
    assert sw_insta < 0.5 * sw_teacher
    assert sw_insta <= sw_2rf * 1.05


def test_toy_slimflow_smaller_student_beats_the_teacher_at_one_step(toy):
    small = ToyNet(time_scale=1.0, width=48)
    torch.manual_seed(3)
    slim = Reflow(ReflowConfig(anneal_steps=200), toy.teacher, Student.full(toy.teacher), backbone=small)
    fit(slim, toy.pairs, steps=300, lr=2e-3)
    n_teacher, n_student = num_parameters(toy.teacher.denoiser.backbone), num_parameters(slim.student.denoiser)
    small_teacher = as_teacher(slim.student)  # the small 2-RF model guides its one-step distillation
    insta = InstaFlow(InstaFlowConfig(flow_guidance_weight=1.0), small_teacher, Student.full(small_teacher))
    fit(insta, toy.pairs, steps=150, lr=5e-4)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    real = mixture(2000, torch.Generator().manual_seed(2))
    sw_teacher = sliced_wasserstein(toy.teacher.sample(noise, Conditioning(), linspace_grid(1)), real)
    sw_slim = sliced_wasserstein(insta.sampler()(noise, Conditioning(), 1), real)
    print(f"SlimFlow: {n_student} parameters vs teacher {n_teacher}; 1-step SW teacher {sw_teacher:.3f} "
          f"student {sw_slim:.3f}")  # fmt: skip
    assert n_student < 0.25 * n_teacher
    assert sw_slim < 0.5 * sw_teacher


def test_instaflow_solves_targets_online_without_pairs_and_adds_flow_guidance():
    from fewstep.objectives.protocol import Batch

    teacher = make_teacher("flow")
    insta = InstaFlow(InstaFlowConfig(target_steps=4, flow_guidance_weight=0.5), teacher, Student.full(teacher))
    out = insta.loss(Batch(cond=Conditioning(), x0=torch.zeros(8, 2)), 0, "student")
    out.loss.backward()
    assert math.isfinite(out.metrics["loss"]) and out.metrics["flow_guidance"] > 0
    assert out.metrics["loss"] == pytest.approx(out.metrics["distill"] + 0.5 * out.metrics["flow_guidance"], rel=1e-5)


def test_pairs_cli_writes_a_recipes_pairs(tmp_path):
    from fewstep.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "pairs"
    args = ["pairs", "reflow/sd15_reflow", "teacher.pretrained=tiny:sd15", f"data.path={out}", "--num-pairs", "3",
            "--steps", "2", "--prompts", str(prompts), "--shard-size", "2"]  # fmt: skip
    assert main(args) == 0
    noise, sample, cond = PairDataset(out).batch([0, 1, 2])
    assert noise.shape == sample.shape and noise.shape[0] == 3 and cond.prompt_embeds.shape[0] == 3
    assert json.loads((out / MANIFEST).read_text())["settings"]["guidance_scale"] == 1.5  # the recipe's teacher w


def test_slimflow_student_backbone_from_a_recipe_block_is_smaller_and_trains():
    from fewstep.models.loading import load_teacher
    from fewstep.objectives.protocol import Batch

    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-flow", family="auto", dtype="float32",
                                           guidance_scale=1.0, revision=None, variant=None))  # fmt: skip
    config = ReflowConfig(student_backbone={"block_out_channels": [16, 32], "attention_head_dim": 8}, anneal_steps=10)
    slim = Reflow(config, teacher, Student.full(teacher))
    n_teacher, n_student = num_parameters(teacher.denoiser.backbone), num_parameters(slim.student.denoiser.backbone)
    print(f"SlimFlow digits UNet: {n_student} parameters vs teacher {n_teacher}")
    assert n_student < 0.3 * n_teacher
    cond = Conditioning(class_labels=torch.tensor([1, 2]))
    batch = Batch(cond=cond, x0=torch.zeros(2, 1, 8, 8), extra={"noise": torch.randn(2, 1, 8, 8)})
    out = slim.loss(batch, 0, "student")
    out.loss.backward()
    assert out.metrics["anneal_beta"] == 1.0 and math.isfinite(out.metrics["loss"])
    with pytest.raises(ValueError, match="not in UNet2DModel's config"):
        Reflow(ReflowConfig(student_backbone={"width": 3}), teacher, Student.full(teacher))


class _Perceptual(torch.nn.Module):
    """LPIPS-shaped: unit-normalised conv features of both images, squared difference summed over channels and
    averaged over space; ``[b, 1, 1, 1]`` as lpips returns. Random weights: the loss plumbing is what is tested."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = torch.nn.functional.normalize(self.conv(a), dim=1)
        fb = torch.nn.functional.normalize(self.conv(b), dim=1)
        return ((fa - fb) ** 2).sum(1).mean((1, 2)).reshape(-1, 1, 1, 1)


def test_lpips_huber_adds_the_perceptual_term_and_trains(tmp_path):
    """rfpp's LPIPS-Huber on the shipped 8×8 digits flow teacher: grey images go to RGB at 224 px through a local
    TorchScript file; the loss is (1 − τ)·Huber + LPIPS per sample and its gradient reaches the student."""
    from fewstep.models.loading import load_teacher
    from fewstep.objectives.protocol import Batch

    torch.manual_seed(0)
    x = torch.zeros(1, 3, 224, 224)
    path = tmp_path / "lpips.pt"
    torch.jit.trace(_Perceptual().eval(), (x, x)).save(str(path))
    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-flow", guidance_scale=1.0))
    student = Student.full(teacher)
    huber = Reflow(ReflowConfig(loss_type="pseudo_huber"), teacher, student)
    lpips = Reflow(ReflowConfig(loss_type="lpips_huber", lpips_weights=str(path)), teacher, student)

    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    batch = Batch(cond=Conditioning(class_labels=torch.arange(8)), x0=x0, extra={"noise": torch.randn(8, 1, 8, 8)})
    assert float(lpips_distance(lpips.lpips, x0, x0).abs().max()) < 1e-6  # identical images: distance 0
    assert float(lpips_distance(lpips.lpips, x0, -x0).min()) > 1e-3

    torch.manual_seed(2)
    plain = huber.loss(batch, 0, "student").loss
    torch.manual_seed(2)
    out = lpips.loss(batch, 0, "student")
    assert out.loss.item() > 0 and abs(out.loss.item() - plain.item()) > 1e-4  # the perceptual term is in it

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for step in range(15):
        torch.manual_seed(100)  # the same τ each step: the loss must fall
        loss = lpips.loss(batch, step, "student").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
