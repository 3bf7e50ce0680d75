"""Periodic evaluation in a 4-step tiny training run (the trainer given ``fewstep.eval.periodic``'s evaluator):
scalars in tensorboard, reports per evaluation, the best checkpoint kept (never pruned, survives resume), one clear
error at startup when no metric fits, and one warning when ``train()`` gets no evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from fewstep.config.load import load_recipe
from fewstep.eval.harness import evaluate
from fewstep.eval.periodic import Best, periodic_evaluator, read_best
from fewstep.eval.targets import run_target
from fewstep.train.loop import train

DIGITS = "quickstart/digits_lcm"  # full LCM student of the shipped fewstep:digits-vp teacher


def overrides(run: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        f"train.max_steps={max_steps}", "train.checkpoint_every=1", "train.keep_last=1", "train.sample_every=null",
        "train.progress=false", "train.log_every=1", "train.ema_decay=0.5", "data.batch_size=4",
        "optim.warmup_steps=0", "eval.every_steps=2", "eval.steps=[1,2]", "eval.num_samples=10",
        "eval.batch_size=10", f"output_dir={run}", *extra,
    ]  # fmt: skip


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run / "fewstep").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_eval_every_two_steps_logs_scalars_and_keeps_the_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    # A vanishing learning rate keeps the weights (and so every evaluation) identical: the first evaluation stays
    # the best (only a strictly better value replaces it), so the kept checkpoint is step 2, pruned by keep_last=1.
    train(load_recipe(DIGITS, overrides(run, 4, "optim.lr=1e-30")), evaluator=periodic_evaluator)
    logged = scalars(run)
    for tag in ("eval/fid@1", "eval/fid@2", "eval/accuracy@1", "eval/accuracy@2", "eval/best_fid@2"):
        assert [step for step, _ in logged[tag]] == [2, 4], tag
    fid = [value for _, value in logged["eval/fid@2"]]
    assert fid[0] == fid[1] > 0

    for step in (2, 4):
        report = json.loads((run / "eval" / f"step_{step:08d}" / "eval.json").read_text())
        assert report["target"]["weights"] == "ema" and report["num_samples"] == 10
        assert [r["nfe_per_image"] for r in report["rows"]] == [1, 2]
        assert (run / "eval" / f"step_{step:08d}" / "grid.png").is_file()

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["best", "step_00000004"]  # step 2 itself was pruned; its copy is the best
    best = run / "checkpoints" / "best"
    assert (best / "COMPLETE").is_file() and json.loads((best / "state.json").read_text())["step"] == 2
    record = json.loads((best / "best.json").read_text())
    assert record["step"] == 2 and record["key"] == "fid@2" and record["value"] == pytest.approx(fid[0], rel=1e-6)
    assert record["higher_is_better"] is False and record["weights_evaluated"] == "ema"

    # The kept checkpoint loads like any other: `fewstep eval RUN --checkpoint best`.
    target = run_target(run, checkpoint="best", steps=[1], teacher_steps=[], device="cpu")
    assert target.info["checkpoint"].endswith("best") and target.samplers[0].info["weights"] == "ema"

    # Resume to 6 steps: the stored best is read back, an equal value does not replace it.
    train(load_recipe(DIGITS, overrides(run, 6, "optim.lr=1e-30")), evaluator=periodic_evaluator)
    assert read_best(run).step == 2
    assert [step for step, _ in scalars(run)["eval/fid@2"]] == [2, 4, 6]


def test_a_better_value_replaces_the_best(tmp_path):
    run = tmp_path / "run"
    extra = ("optim.lr=1e-2", "eval.metrics=[accuracy,fid]", "eval.best_metric=fid", "eval.best_steps=1")
    train(load_recipe(DIGITS, overrides(run, 4, *extra)), evaluator=periodic_evaluator)
    logged = scalars(run)
    fid = dict(logged["eval/fid@1"])
    assert fid[4] < fid[2]  # two LCM steps at this learning rate improve the 1-step student (deterministic on CPU)
    best = read_best(run)
    assert (best.step, best.key) == (4, "fid@1") and best.value == pytest.approx(fid[4], rel=1e-6)
    assert dict(logged["eval/best_fid@1"]) == pytest.approx({2: fid[2], 4: fid[4]}, rel=1e-6)
    kept, last = run / "checkpoints" / "best", run / "checkpoints" / "step_00000004"
    assert json.loads((kept / "state.json").read_text())["step"] == 4
    for name in ("ema.safetensors", "trainable/student.safetensors"):
        a, b = load_file(kept / name), load_file(last / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_metric_for_the_teacher_is_one_error_at_startup(tmp_path):
    """An unconditional 8×8 teacher: no benchmark metric applies, so training does not start."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)  # fmt: skip
    teacher = tmp_path / "uncond"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(teacher)
    run = tmp_path / "run"
    recipe = load_recipe(DIGITS, overrides(run, 4, f"teacher.pretrained={teacher}", "objective.w_min=0",
                                           "objective.w_max=0", "teacher.guidance_scale=1"))  # fmt: skip
    with pytest.raises(ValueError, match=r"eval.every_steps=2 but no evaluation metric is available") as err:
        train(recipe, evaluator=periodic_evaluator)
    assert "none-conditioned images of shape [1, 8, 8]" in str(err.value)
    assert not (run / "checkpoints").exists()

    recipe = load_recipe(DIGITS, overrides(run, 4, "eval.metrics=[clip]"))
    with pytest.raises(ValueError, match=r"`clip` \(CLIP score\) needs a text-conditioned model"):
        train(recipe, evaluator=periodic_evaluator)


def test_best_settings_are_validated_with_the_recipe(tmp_path):
    from fewstep.config.errors import RecipeError

    with pytest.raises(RecipeError, match="best_steps") as err:
        load_recipe(DIGITS, overrides(tmp_path, 4, "eval.best_steps=4", "eval.metrics=[fid]",
                                      "eval.best_metric=accuracy"))  # fmt: skip
    assert "is not one of eval.steps [1, 2]" in str(err.value) and "is not one of eval.metrics" in str(err.value)


def test_best_direction_follows_the_metric():
    assert Best(2, "accuracy@4", 0.5, higher_is_better=True).beaten_by(0.6)
    assert not Best(2, "fid@4", 3.0, higher_is_better=False).beaten_by(3.0)
    assert Best(2, "fid@4", 3.0, higher_is_better=False).beaten_by(2.9)


def test_custom_teacher_runs_are_evaluated_at_their_data_shape(tmp_path):
    """A teacher without a pipeline (``Teacher.from_module``): the noise shape comes from the data."""
    from diffusers import DDPMScheduler

    from fewstep.assets import asset_path
    from fewstep.config import validate_recipe
    from fewstep.models import Conditioning, Teacher
    from fewstep.noise import VPSchedule

    asset = asset_path("digits-vp")
    unet = UNet2DModel.from_pretrained(asset / "unet")
    schedule = VPSchedule.from_diffusers(dict(DDPMScheduler.from_pretrained(asset / "scheduler").config))
    null = Conditioning(class_labels=torch.tensor([10]))
    teacher = Teacher.from_module(unet, schedule, "epsilon", adapter="unet2d", guidance_scale=2.0, null_cond=null)
    run = tmp_path / "run"
    recipe = load_recipe(DIGITS, overrides(run, 2, "teacher.pretrained=custom:digits-unet"))
    train(validate_recipe(recipe.model_dump()), teacher=teacher, evaluator=periodic_evaluator)
    report = json.loads((run / "eval" / "step_00000002" / "eval.json").read_text())
    assert report["models"]["student (lcm, ema)"]["noise_shape"] == [1, 8, 8] and "fid" in report["metrics"]

    target = run_target(run, steps=[1], teacher_steps=[2], device="cpu", teacher=teacher)
    assert target.dataset == "digits" and [s.noise_shape for s in target.samplers] == [(1, 8, 8), (1, 8, 8)]
    report = evaluate(target.samplers, [], target.inputs(4), progress=False, timing_repeats=1)
    assert [r.nfe_per_image for r in report.rows] == [1, 4]  # the teacher at w = 2 (the recipe's): 2 per step


def test_train_without_an_evaluator_warns_once_and_trains(tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="fewstep.train.loop"):
        train(load_recipe(DIGITS, overrides(run, 2, "optim.lr=1e-30")))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        len(warnings) == 1 and "eval.every_steps=2 is set, but train() was called without an evaluator" in warnings[0]
    )
    assert "evaluator=fewstep.eval.periodic.periodic_evaluator" in warnings[0] and "fewstep train" in warnings[0]
    assert not (run / "eval").exists() and not (run / "checkpoints" / "best").exists()
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
