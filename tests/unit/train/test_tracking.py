"""Trackers: a tiny digits run logs losses, learning rates, throughput, memory and its sample grids to TensorBoard
and to an offline wandb run; a tracker that is not installed is refused by ``fewstep validate`` and by training."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewstep.cli.main import main
from fewstep.config.checks import TRACKER_PACKAGES, input_issues
from fewstep.config.errors import RecipeError
from fewstep.config.load import dump_recipe, validate_recipe
from fewstep.config.schema import TrackerName
from fewstep.train.logging import StepMeter, item_shape, learning_rates, wandb_offline
from fewstep.train.loop import train
from tests.helpers import digits_lora_recipe, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

SCALARS = {"loss", "lr/student", "throughput/samples_per_s", "time/step_s", "memory/peak_rss_mib"}


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows of an offline wandb run file (``run-<id>.wandb``), decoded with wandb's own record protobuf.

    The file is a 7-byte header (``:W&B``, magic, version) and then a LevelDB-style log: 32 KiB blocks of records,
    each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last) | data``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item})
            pending = b""
    return rows


def test_tensorboard_and_offline_wandb_get_scalars_and_sample_grids(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    recipe = validate_recipe(
        digits_lora_recipe(tmp_path / "run", max_steps=4, checkpoint_every=4, log_every=1, sample_every=2,
                           sample_steps=[1], num_sample_images=4, log_with=["tensorboard", "wandb"])
    )  # fmt: skip
    run = train(recipe)
    import wandb

    wandb.teardown()  # wandb's service writes the offline run file in the background; this waits for it (as exit does)
    (run_file,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    steps = {int(row["_step"]) for row in rows}
    assert steps == {1, 2, 3, 4}, steps
    logged = set().union(*rows)
    assert SCALARS <= logged, logged
    assert any(key.startswith("samples") for key in logged), "no sample grid in the wandb history"
    assert float(next(r["lr/student"] for r in rows)) == pytest.approx(1e-3)
    assert all(float(r["throughput/samples_per_s"]) > 0 for r in rows if "throughput/samples_per_s" in r)
    images = list(run_file.parent.glob("files/media/images/samples_*.png"))
    assert len(images) == 2, images  # the grids of steps 2 and 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "fewstep").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert SCALARS <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    for g in grids:  # 4 digits as 8× tiles, and a white margin for the row and column labels
        assert 4 * 64 < g.width < 4 * 64 + 64 and 64 < g.height < 64 + 32, (g.width, g.height)


def missing_tracker() -> str:
    """A tracker accelerate knows whose package is not installed here."""
    for name in ("comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "mlflow"):
        if importlib.util.find_spec(name) is None:
            return name
    pytest.skip("every optional tracker is installed")


def test_a_tracker_that_is_not_installed_is_refused_by_validate_and_train(tmp_path, capsys):
    name = missing_tracker()
    data = digits_lora_recipe(tmp_path / "run", log_with=["tensorboard", name])
    recipe = validate_recipe(data)  # the name itself is fine
    (issue,) = input_issues(recipe)
    assert issue.loc == ("train", "log_with", 1) and f"pip install {TRACKER_PACKAGES[name]}" in str(issue)

    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.log_with[1]: is not installed" in err, err
    assert f"pip install {TRACKER_PACKAGES[name]}" in err, err

    with pytest.raises(RecipeError, match=f"pip install {TRACKER_PACKAGES[name]}"):
        train(recipe)
    assert not (tmp_path / "run").exists(), "training started before the tracker was checked"


def test_log_with_takes_one_name_and_refuses_unknown_ones(tmp_path):
    assert validate_recipe(digits_lora_recipe(tmp_path, log_with="wandb")).train.log_with == ["wandb"]
    assert validate_recipe(digits_lora_recipe(tmp_path, log_with=[])).train.log_with == []
    with pytest.raises(RecipeError, match="train.log_with.0") as err:
        validate_recipe(digits_lora_recipe(tmp_path, log_with=["wandbb"]))
    assert "'wandb'" in str(err.value)
    import accelerate.tracking

    assert set(TrackerName.__args__) == set(TRACKER_PACKAGES) <= set(accelerate.tracking.LOGGER_TYPE_TO_CLASS)


def test_wandb_goes_offline_without_an_api_key(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login me password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline()  # no key for api.wandb.ai
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_offline()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert not wandb_offline()


def test_throughput_counts_samples_tokens_and_frames():
    video = StepMeter(8, (16, 5, 4, 4), None, torch.device("cpu"))  # [c, f, h, w]: 5 frames a sample
    with video.timed():
        sum(range(10_000))
    first = video.scalars()
    assert first["throughput/samples_per_s"] == pytest.approx(8 / first["time/step_s"])
    assert first["throughput/frames_per_s"] == pytest.approx(5 * first["throughput/samples_per_s"])
    assert "throughput/tokens_per_s" not in first and first["memory/peak_rss_mib"] > 10
    assert "time/step_s" not in video.scalars(), "a new interval starts after each report"

    image = StepMeter(4, (16, 8, 8), 16, torch.device("cpu"))  # Flux-like: (8/2)·(8/2) tokens a sample
    with image.timed():
        sum(range(10_000))
    scalars = image.scalars()
    assert scalars["throughput/tokens_per_s"] == pytest.approx(16 * scalars["throughput/samples_per_s"])


def test_learning_rates_name_every_parameter_group():
    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    single = torch.optim.AdamW([w[0]], lr=1e-3)
    several = torch.optim.AdamW([{"params": [w[1]], "lr": 2e-4}, {"params": [w[2]], "lr": 5e-5}])
    assert learning_rates({"student": single, "fake_score": several}) == {
        "lr/student": 1e-3, "lr/fake_score/0": 2e-4, "lr/fake_score/1": 5e-5,
    }  # fmt: skip


def test_the_token_count_of_transformer_teachers_feeds_tokens_per_s():
    from accelerate import Accelerator

    from fewstep.config.schema import TrainConfig
    from fewstep.models.loading import load_teacher
    from fewstep.train.logging import TrainingLog

    teacher = load_teacher(SimpleNamespace(pretrained="tiny:sd3"))
    recipe = SimpleNamespace(train=TrainConfig(), data=SimpleNamespace(resolution=32, batch_size=2))
    meter = TrainingLog(Accelerator(cpu=True), recipe, teacher).meter
    shape = item_shape(teacher, 32)  # [c, h, w] of the latent at 32 pixels
    patch = teacher.denoiser.backbone.config.patch_size
    assert meter.tokens_per_item == (shape[1] // patch) * (shape[2] // patch) > 0, shape
    assert meter.frames_per_item is None and meter.samples_per_step == 2


def test_alternating_phases_are_all_logged_whatever_the_cadence(tmp_path):
    """DMD2 with one fake-score step per generator step: every second step is the fake score's, and ``log_every: 2``
    lands on those only. Each log carries every scalar's latest value, so the generator's ``loss_dm`` (from the step
    before) is logged too, and each group has its own ``loss/<group>`` curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = validate_recipe({
        "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2", "num_student_steps": 1, "fake_steps_per_generator_step": 1},
        "data": {"source": "digits", "batch_size": 4},
        "optim": {"lr": 1e-4, "lr_scheduler": "constant"},
        "train": {"max_steps": 4, "checkpoint_every": 4, "log_every": 2, "sample_every": None, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    run = train(recipe)
    (events,) = (run / "fewstep").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"metrics/loss_dm", "metrics/loss_fake", "loss/student", "loss/fake_score"} <= tags, sorted(tags)
    assert [e.step for e in acc.Scalars("metrics/loss_dm")] == [2, 4]
    assert [e.step for e in acc.Scalars("loss/fake_score")] == [2, 4]
