"""Evaluation targets: a training run (EMA or raw weights, teacher reference), its export sampled by stock diffusers
(the same images as the run's own sampler), teachers, and the errors for targets that are none of these."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config import load_recipe
from fewstep.eval.harness import evaluate
from fewstep.eval.samplers import student_sampler
from fewstep.eval.suite import build_metrics
from fewstep.eval.targets import export_target, load_target, run_target, target_kind
from fewstep.export import export_run, read_source
from fewstep.train.loop import train
from fewstep.train.manifest import IntegrityError
from tests.helpers import captioned_noise_images, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

SHORT = ["train.checkpoint_every=2", "train.sample_every=null", "train.progress=false", "optim.warmup_steps=0",
         "train.mixed_precision=no", "train.max_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The quickstart recipe (full LCM student of fewstep:digits-vp, teacher w = 2), 2 steps with EMA."""
    run = tmp_path_factory.mktemp("digits") / "run"
    overrides = [*SHORT, "train.ema_decay=0.5", "optim.lr=1e-2", "data.batch_size=8", f"output_dir={run}"]
    train(load_recipe("quickstart/digits_lcm", overrides))
    return run


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory) -> Path:
    """The SD1.5 LCM-LoRA recipe on tiny:sd15 (16 px images with captions), 2 steps."""
    images = captioned_noise_images(tmp_path_factory.mktemp("images"))
    run = tmp_path_factory.mktemp("sd15") / "run"
    overrides = [*SHORT, "teacher.pretrained=tiny:sd15", "optim.lr=1e-2", "data.batch_size=2", f"data.path={images}",
                 "data.resolution=16", "data.num_workers=0", "student.lora.rank=4",
                 "student.gradient_checkpointing=false", f"output_dir={run}"]  # fmt: skip
    train(load_recipe("lcm/sd15_lcm_lora", overrides))
    return run


def images_of(report) -> torch.Tensor:
    return torch.stack([row.preview for row in report.rows])


def test_run_target_samples_ema_weights_and_the_guided_teacher(digits_run):
    target = run_target(digits_run, steps=[1, 2], teacher_steps=[4], device="cpu")
    assert (target.kind, target.conditioning, target.num_classes, target.dataset) == ("run", "class", 10, "digits")
    student, teacher = target.samplers
    assert student.name == "student (lcm, ema)" and student.info["weights"] == "ema"
    assert target.info["weights"] == "ema" and target.info["checkpoint"].endswith("step_00000002")
    assert teacher.info["guidance_scale"] == 2.0 and "teacher.guidance_scale" in teacher.info["guidance_source"]

    ckpt = digits_run / "checkpoints" / "step_00000002"
    ema, raw = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "trainable" / "student.safetensors")
    key = "denoiser.backbone.conv_in.weight"
    assert not torch.equal(ema[f"student/{key}"], raw[key])  # EMA (decay 0.5) lags the trained weights
    assert torch.equal(student.network.conv_in.weight, ema[f"student/{key}"])
    raw_student = run_target(digits_run, steps=[1], teacher_steps=[], weights="raw", device="cpu").samplers[0]
    assert raw_student.info["weights"] == "raw" and torch.equal(raw_student.network.conv_in.weight, raw[key])

    report = evaluate(target.samplers, build_metrics(None, target.dataset, target.conditioning), target.inputs(10),
                      batch_size=10, progress=False, timing_repeats=1)  # fmt: skip
    nfe = [(r.model, r.num_steps, r.nfe_per_image) for r in report.rows]
    assert nfe == [("student (lcm, ema)", 1, 1), ("student (lcm, ema)", 2, 2), ("teacher (DDIM, w=2)", 4, 8)]
    assert report.rows[1].schedule["timesteps"] == [999, 499]  # LCM picks from the 50-interval skipping grid


def test_exported_digits_student_sampled_by_stock_scheduler_matches_the_run(digits_run, tmp_path):
    out = export_run(digits_run, tmp_path / "export")  # the EMA weights (the run kept them), a merged DDPMPipeline
    assert target_kind(str(out)) == "export"
    assert read_source(out) == {"run": str(digits_run), "checkpoint": str(digits_run / "checkpoints" / "step_00000002"),
                                "weights": "ema"}  # fmt: skip
    exported = export_target(out, steps=[1, 2], device="cpu")
    assert exported.conditioning == "class" and exported.dataset == "digits"
    sampler = exported.samplers[0]
    assert sampler.info["weights"] == "exported" and "LCMScheduler" in sampler.info["scheduler"]
    run = run_target(digits_run, steps=[1, 2], teacher_steps=[], device="cpu")  # the same default: EMA
    kwargs = dict(batch_size=5, progress=False, timing_repeats=1, grid_images=10)
    theirs = evaluate(exported.samplers, [], exported.inputs(10), **kwargs)
    ours = evaluate(run.samplers, [], run.inputs(10), **kwargs)
    assert [r.nfe_per_image for r in theirs.rows] == [1, 2]
    assert (images_of(theirs) - images_of(ours)).abs().max() <= 1 / 255  # same images up to 8-bit rounding
    assert images_of(ours).std() > 0.1
    with pytest.raises(ValueError, match=r"exports schedules for \[1, 2, 4, 8\] steps, not \[3\]"):
        export_target(out, steps=[3], device="cpu")


def test_text_run_and_its_lora_export_through_stock_diffusers_give_the_same_images(sd15_run, tmp_path):
    target = run_target(sd15_run, steps=[1, 2], teacher_steps=[2], device="cpu")
    assert target.conditioning == "text" and target.dataset is None
    student, teacher = target.samplers
    assert student.info["weights"] == "raw" and student.info["student"] == "lora"
    # LCM-LoRA distils ω ∈ [5, 15]: the reference teacher is guided with w = 1 + 10.
    assert teacher.name == "teacher (DDIM, w=11)" and "ω range" in teacher.info["guidance_source"]

    out = export_run(sd15_run, tmp_path / "export")
    exported = export_target(out, steps=[1, 2], teacher_steps=[2], device="cpu")  # base model from the card
    assert "LoRA (pytorch_lora_weights.safetensors) on tiny:sd15" in exported.samplers[0].info["source"]
    prompts = ["a red circle", "a blue square", "a green line"]
    kwargs = dict(batch_size=3, progress=False, timing_repeats=1, warmup=False)
    ours = evaluate(target.samplers, [], target.inputs(3, prompts), **kwargs)
    theirs = evaluate(exported.samplers, [], exported.inputs(3, prompts), **kwargs)
    nfe = {(r.model, r.num_steps): r.nfe_per_image for r in [*ours.rows, *theirs.rows]}
    assert nfe == {("student (lcm, raw)", 1): 1, ("student (lcm, raw)", 2): 2, ("teacher (DDIM, w=11)", 2): 4,
                   ("student (lcm, exported)", 1): 1, ("student (lcm, exported)", 2): 2,
                   ("teacher (DDIM, w=7.5)", 2): 4}  # fmt: skip
    assert ours.rows[0].preview.shape == (3, 3, 16, 16)
    assert (ours.rows[0].preview - theirs.rows[0].preview).abs().max() <= 1 / 255
    assert (ours.rows[1].preview - theirs.rows[1].preview).abs().max() <= 1 / 255

    with pytest.raises(FileNotFoundError, match="kept no EMA"):
        run_target(sd15_run, weights="ema", device="cpu")
    no_card = tmp_path / "no_card"
    shutil.copytree(out, no_card)
    (no_card / "README.md").unlink()
    with pytest.raises(IntegrityError, match="README.md is listed in .* but missing"):
        export_target(no_card, steps=[1], device="cpu")
    (no_card / "manifest.json").unlink()  # as an export written before manifests: loaded, unverified
    with pytest.raises(FileNotFoundError, match="--base"):
        export_target(no_card, steps=[1], device="cpu")


def test_bad_targets_name_the_problem(tmp_path, digits_run):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(str(tmp_path / "missing" / "run"))
    with pytest.raises(FileNotFoundError, match="not a training run"):
        target_kind(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Set eval.every_steps"):
        run_target(digits_run, checkpoint="best", device="cpu")
    assert target_kind("tiny:sd15") == "teacher" and target_kind("org/model") == "teacher"
    assert target_kind(str(digits_run)) == "run"


def test_student_schedule_record_passes_the_image_shape_for_dynamic_shift():
    """Flux's shift depends on the token count: the recorded levels need the sampler's image shape."""
    from fewstep.config import load_recipe
    from fewstep.train.build import build_components

    recipe = load_recipe("dmd/flux_dmd2_lora", ["teacher.pretrained=tiny:flux", "student.lora.rank=4"])
    sampler = student_sampler(build_components(recipe), [1, 2])
    levels = sampler.schedule(2)["levels"]
    assert len(levels) == 2 and levels[0] == 1.0 and 0.0 < levels[1] < 1.0
