"""Collapse alarms: each detector on synthetic images and on real digits, once-per-episode firing, a DMD2 run on the
shipped digits teacher with a far too high student learning rate that saturates and loses its DM signal, and a DMD2
run on the moving-digits video teacher whose student stays at the washed-out one-step mean."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from fewstep.config.load import validate_recipe
from fewstep.config.schema import AlarmsConfig
from fewstep.data.digits import DigitsDataset
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.vae import decode_latents
from fewstep.solvers.grids import teacher_taus
from fewstep.train.alarms import ADVICE, AlarmMonitor, gap_condition, saturated_share, seed_variance, solid_share
from fewstep.train.loop import train
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

CFG = AlarmsConfig()


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """64 real digits as images in [0, 1] ``[64, 1, 8, 8]``."""
    return (DigitsDataset("train").images[:64] + 1) / 2


@pytest.fixture(scope="module")
def teacher_digits() -> list[torch.Tensor]:
    """Two grids of 20 samples of the shipped digits teacher (16 DDIM steps, CFG 2), from different seeds."""
    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp", guidance_scale=2.0))
    cond = Conditioning(class_labels=torch.arange(20) % 10)
    taus = teacher_taus(teacher.schedule, 16)
    grids = []
    for seed in (0, 1):
        noise = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            grids.append(decode_latents(teacher, teacher.sample(noise, cond, taus, teacher.uncond_like(cond))))
    return grids


def test_detectors_on_synthetic_images(digits):
    black, grey = torch.zeros(8, 3, 16, 16), torch.full((8, 3, 16, 16), 0.5)
    assert solid_share(black, CFG.solid_std) == solid_share(grey, CFG.solid_std) == 1.0
    half = torch.cat([grey[:4], digits[:4].expand(4, 3, 8, 8).repeat(1, 1, 2, 2)])
    assert solid_share(half, CFG.solid_std) == 0.5
    assert solid_share(digits, CFG.solid_std) == 0.0

    burnt = (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) > 0).float()  # only 0s and 1s
    assert saturated_share(burnt, CFG.saturation_margin) == 1.0
    assert saturated_share(grey, CFG.saturation_margin) == 0.0
    assert saturated_share(digits, CFG.saturation_margin) == pytest.approx(0.58, abs=0.02)  # black backgrounds

    assert seed_variance(digits[:1].expand(8, 1, 8, 8)) == 0.0  # every seed the same image
    assert seed_variance(digits) == pytest.approx(0.075, abs=0.01)


@pytest.mark.parametrize("name", ["digits", "teacher_digits"])
def test_normal_digits_fire_nothing(name, request):
    grids = request.getfixturevalue(name)
    grids = [grids[:32], grids[32:]] if name == "digits" else grids
    monitor = AlarmMonitor(CFG)
    for step, grid in enumerate(grids):
        assert monitor.samples(step, [grid]) == ([], [])
    assert saturated_share(grids[0], CFG.saturation_margin) < CFG.saturation_share


def test_sample_alarms_fire_once_per_episode(digits):
    monitor = AlarmMonitor(CFG)
    collapsed = digits[:1].expand(32, 1, 8, 8) + 0.01 * torch.randn(32, 1, 8, 8, generator=torch.Generator())
    black = torch.zeros(32, 1, 8, 8)
    assert monitor.samples(100, [digits[:32]]) == ([], [])  # the reference grid
    fired, _ = monitor.samples(200, [collapsed.clamp(0, 1)])
    assert [a.name for a in fired] == ["mode_collapse"]
    assert "0.0" in fired[0].what and "first sample grid" in fired[0].what
    assert monitor.samples(300, [collapsed.clamp(0, 1)]) == ([], [])  # still collapsed: the same episode
    assert monitor.samples(400, [digits[32:]]) == ([], ["mode_collapse"])  # recovered: the episode ends
    fired, _ = monitor.samples(500, [black])  # a new episode, and two more alarms
    assert sorted(a.name for a in fired) == ["mode_collapse", "saturation", "solid"]
    message = next(a for a in fired if a.name == "solid").message
    assert message.startswith("ALARM solid at step 500: 100% of the samples are flat")
    assert ADVICE["solid"][1] in message
    assert monitor.samples(600, [black]) == ([], [])
    nan = torch.full((32, 1, 8, 8), float("nan"))  # a half-precision VAE overflowing: the grid's PNG is black
    assert monitor.samples(700, [digits[:32]]) == ([], ["mode_collapse", "saturation", "solid"])
    assert sorted(a.name for a in monitor.samples(800, [nan])[0]) == ["mode_collapse", "saturation", "solid"]


def test_gap_alarms_compare_with_the_early_median():
    assert gap_condition(11.0, 1.0, 10.0, 0.1) == "gap_explode"
    assert gap_condition(0.05, 1.0, 10.0, 0.1) == "gap_collapse"
    assert gap_condition(3.0, 1.0, 10.0, 0.1) is None and gap_condition(5.0, 0.0, 10.0, 0.1) is None

    monitor = AlarmMonitor(AlarmsConfig(warmup_steps=10, window=3))
    fired = []
    values = [100.0] * 10 + [1.0, 2.0, 1.5] + [1.0, 30.0, 40.0, 50.0, 60.0] + [2.0, 2.0, 2.0] + [0.05, 0.05, 0.1]
    for step, value in enumerate(values):
        new, cleared = monitor.metrics(step, {"dm_grad_norm": value, "loss_dm": 0.1})
        fired += [(a.step, a.name) for a in new]
        monitor.metrics(step, {"loss_fake": 0.3})  # a fake-score step: no gap measured, nothing changes
    # warm-up values (100) are ignored; the reference is median(1, 2, 1.5) = 1.5; the current value is the median of
    # the last 3, so a single spike (30 at step 14) does not fire, the sustained rise does (once)
    assert fired == [(15, "gap_explode"), (22, "gap_collapse")], fired  # median(2, 0.05, 0.05) at 22
    assert monitor.active == {"gap_collapse"}
    monitor.metrics(24, {"dm_grad_norm": 1.0, "phase_index": 1.0})  # Phased DMD's next phase: a new reference
    assert monitor.active == set()


DMD2_RUN = {
    "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
    "student": {"kind": "lora", "lora": {"rank": 8}},
    "objective": {"name": "dmd2", "num_student_steps": 1, "real_guidance_scale": 2.0,
                  "fake_steps_per_generator_step": 1, "health_reference_steps": 8},
    "data": {"source": "digits", "batch_size": 16},
    "optim": {"lr": 3e-2, "group_lr": {"fake_score": 1e-3}, "lr_scheduler": "constant"},
    "train": {"max_steps": 12, "checkpoint_every": 12, "log_every": 1, "sample_every": 4, "sample_steps": [1],
              "num_sample_images": 20, "progress": False, "alarms": {"warmup_steps": 0, "window": 1}},
}  # fmt: skip


def alarms_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALARM")]


def test_a_far_too_high_student_lr_saturates_and_loses_the_dm_signal(tmp_path, caplog):
    """DMD2 on the shipped digits teacher with the student's LR at 3e-2 (fine: ~1e-4): within a few steps 98% of the
    pixels sit at 0 or 1 and the fake/real gap falls to ~3% of its first value. Each alarm fires once, though both
    conditions hold to the end; the trackers get alarm/<name> and the message."""
    recipe = validate_recipe({**DMD2_RUN, "output_dir": str(tmp_path / "run")})
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        run = train(recipe)
    messages = alarms_logged(caplog)
    assert sorted(m.split()[1] for m in messages) == ["gap_collapse", "saturation"], messages
    saturation = next(m for m in messages if m.startswith("ALARM saturation"))
    assert saturation.startswith("ALARM saturation at step 4: ") and "Try: lower the guidance" in saturation

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "fewstep").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("alarm/saturation")] == [(4, 1.0)]
    assert [e.value for e in acc.Scalars("alarm/gap_collapse")] == [1.0]
    (text,) = acc.Tensors("alarm/saturation/message/text_summary")
    assert text.tensor_proto.string_val[0].decode() == saturation


def test_the_same_run_at_a_sane_lr_fires_nothing(tmp_path, caplog):
    recipe = validate_recipe({**DMD2_RUN, "optim": {**DMD2_RUN["optim"], "lr": 1e-4}, "output_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        train(recipe)
    assert alarms_logged(caplog) == []


def test_washed_out_reads_std_ratio_after_its_start():
    monitor = AlarmMonitor(AlarmsConfig(washed_out_after=5, window=2))
    fired, cleared = [], []
    ratios = [0.2] * 5 + [0.3, 0.9, 0.3, 0.3, 0.35, 1.0, 1.1, 0.4, 0.2]
    for step, ratio in enumerate(ratios):
        new, gone = monitor.metrics(step, {"std_ratio": ratio, "loss_dm": 0.1})
        fired += new
        cleared += [(step, name) for name in gone]
    # the blurred start (steps 0-4) is ignored; medians of two: 0.6 at step 6 does not fire, 0.3 at step 8 does;
    # 0.675 at step 10 clears it; 0.3 at step 13 fires it again
    assert [(a.step, a.name) for a in fired] == [(8, "washed_out"), (13, "washed_out")], fired
    assert cleared == [(10, "washed_out")], cleared
    assert (
        fired[0].what == "std_ratio 0.3: the student's samples have 0.3x the pixel std of the teacher's own "
        "(threshold 0.5x)"
    )
    assert (
        fired[0].message.startswith("ALARM washed_out at step 8: std_ratio 0.3")
        and "Try: check the teacher" in fired[0].message
    )


VIDEO_DMD2_RUN = {
    "teacher": {"pretrained": "fewstep:moving-digits-flow", "guidance_scale": 2.0},
    "student": {"kind": "full"},
    "objective": {"name": "dmd2", "num_student_steps": 1, "real_guidance_scale": 2.0,
                  "fake_steps_per_generator_step": 1, "fake_score": "full", "health_reference_steps": 8},
    "data": {"source": "moving_digits", "batch_size": 8},
    "optim": {"lr": 1e-7, "lr_scheduler": "constant"},
    "train": {"max_steps": 6, "checkpoint_every": 6, "log_every": 1, "sample_every": None, "progress": False,
              "alarms": {"warmup_steps": 0, "window": 1, "washed_out_after": 2}},
}  # fmt: skip


def test_a_one_step_video_student_stuck_at_the_blurred_mean_is_washed_out(tmp_path, caplog):
    """DMD2 of the shipped moving-digits teacher with a student that barely moves (LR 1e-7): its one-step clips are
    the teacher's one-step prediction, a digit smeared over the positions it could be at, with about a quarter of the
    pixel std of the teacher's 8-step clips. The alarm fires once, at the first step it checks."""
    recipe = validate_recipe({**VIDEO_DMD2_RUN, "output_dir": str(tmp_path / "run")})
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        train(recipe)
    messages = alarms_logged(caplog)
    assert [m.split()[1] for m in messages] == ["washed_out"], messages
    assert (
        messages[0].startswith("ALARM washed_out at step 2: std_ratio 0.") and "Try: check the teacher" in messages[0]
    )
    ratio = float(messages[0].split("std_ratio ")[1].split(":")[0])
    assert 0.1 < ratio < 0.5, ratio
