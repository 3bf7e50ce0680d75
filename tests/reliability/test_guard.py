"""Training never saves bad weights: an update that leaves non-finite or exploded weights is undone, too many bad
steps in a row stop the run with exit status 1 and the last good checkpoint as the newest, every save checks the
weights first, a failure in the loop leaves an emergency checkpoint, and recipes refuse infinite and NaN numbers.

Every run is real and tiny: the shipped ``fewstep:digits-vp`` teacher with a rank-4 LoRA (or ``tiny:sd15`` for image
folders), a few steps on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep.config import RecipeError, load_recipe, validate_recipe
from fewstep.config.load import dump_recipe
from fewstep.export.run import export_run
from fewstep.train.build import build_components
from fewstep.train.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, load_trainable_weights
from fewstep.train.loop import Trainer, TrainingStopped, make_accelerator, train
from fewstep.train.optim import FlatCopy, WeightCheck
from tests.helpers import digits_lora_recipe, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1e4  # train.max_weight_abs's default


def recipe_data(output_dir: Path, optim: dict[str, Any] | None = None, **train_changes: Any) -> dict[str, Any]:
    return digits_lora_recipe(output_dir, optim, **train_changes)


def make_recipe(output_dir: Path, optim: dict[str, Any] | None = None, **train_changes: Any):
    return validate_recipe(recipe_data(output_dir, optim, **train_changes))


def fewstep_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fewstep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_good(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{where}: {key} is not finite"
            assert float(t.abs().max()) <= LIMIT, f"{where}: {key} reaches {float(t.abs().max())}"


def assert_every_checkpoint_good(run: Path) -> None:
    for ckpt in list_checkpoints(run):
        for group, weights in load_trainable_weights(ckpt).items():
            assert_good(weights, f"{ckpt.name}/{group}")
        if (ckpt / "ema.safetensors").is_file():
            assert_good(load_file(ckpt / "ema.safetensors"), f"{ckpt.name}/ema")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Bad updates are undone; too many in a row stop the run
# ---------------------------------------------------------------------------------------------------------------------


def test_huge_lr_stops_with_exit_1_and_the_last_good_checkpoint_newest(tmp_path):
    """``optim.lr=1e10`` used to train weights up to 2e8 and exit 0. Resumed from a healthy checkpoint with that lr,
    every update is undone and nothing is saved while the steps are bad; the run stops with one error line and status
    1, the healthy checkpoint is still the newest, and the export holds its weights."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    good = load_trainable_weights(checkpoint_dir(run, 2))["student"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_recipe(make_recipe(run, max_steps=8, max_nonfinite=2)))

    result = fewstep_cli("train", str(recipe), "optim.lr=1e10", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Step 5:" in error[0] and "3 bad in a row" in error[0], result.stderr
    assert "max_weight_abs=10000" in error[0] and "lower optim.lr" in error[0]

    assert str(checkpoint_dir(run, 2)) in error[0]
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)  # steps 3 and 4 were bad: not saved
    assert same(load_trainable_weights(checkpoint_dir(run, 2))["student"], good)
    assert_every_checkpoint_good(run)
    exported = export_run(run, tmp_path / "export")
    files = list(exported.rglob("*.safetensors"))
    assert files
    for f in files:
        assert_good(load_file(f), str(f))


def test_nan_producing_setting_saves_nothing_nan(tmp_path, capsys):
    """``optim.eps=1e-300`` is 0 in float32: Adam divides 0 by 0 on the LoRA's zero-gradient weights and every update
    turns them NaN. Each is undone and named, nothing is saved, and a run that reaches ``train.max_steps`` with its
    last steps bad (fewer than ``train.max_nonfinite``) still ends with an error, not as a success."""
    with pytest.raises(TrainingStopped) as err:
        train(make_recipe(tmp_path / "run", optim={"eps": 1e-300}, max_steps=3))
    assert "reached train.max_steps=3 with its last 3 steps bad" in str(err.value)
    assert "the newest checkpoint is none" in str(err.value)
    said = capsys.readouterr().err
    assert "Step 1: the update left non-finite or exploded weights (student: max |w| = nan" in said
    assert "Step 1 is not saved" in said and "Step 3: " in said
    assert list_checkpoints(tmp_path / "run") == []


def snapshot(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    module = trainer.acc.unwrap_model(trainer.modules["student"])
    weights = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizers["student"].state.items() if s}
    return weights, state


def test_one_exploding_step_is_undone_exactly_and_training_goes_on(tmp_path):
    """One update in an otherwise healthy run blows the weights up (its lr is 1e10 for that step only): the weights
    come back bit for bit, the schedule and EMA do not move, and the next steps train."""
    recipe = make_recipe(tmp_path / "run", max_steps=6, checkpoint_every=6, ema_decay=0.9)
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    try:
        group = trainer.optimizers["student"].param_groups[0]
        for _ in range(2):
            trainer.train_step()
        weights, _ = snapshot(trainer)
        ema = {k: v.clone() for k, v in trainer.ema.shadow["student"].items()}
        epoch = trainer.schedulers["student"].last_epoch

        lr, group["lr"] = group["lr"], 1e10
        scalars = trainer.train_step()
        group["lr"] = lr
        after, state_after = snapshot(trainer)
        assert same(after, weights)
        assert all(torch.isfinite(t).all() for s in state_after.values() for t in s.values())  # Adam's moments
        assert same(trainer.ema.shadow["student"], ema) and trainer.schedulers["student"].last_epoch == epoch
        assert trainer.step == 3 and trainer.bad_streak == 1 and scalars["nonfinite_steps"] == 1.0

        trainer.train_step()
        assert trainer.bad_streak == 0 and not same(snapshot(trainer)[0], weights)
        run = trainer.fit()
    finally:
        trainer.release_run_dir()
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["step"] == 6 and summary["nonfinite_steps"] == 1
    assert_every_checkpoint_good(run)


def test_without_rollback_a_bad_update_stops_without_saving(tmp_path):
    """``train.rollback: false`` (no copy, for large full students): the exploded weights cannot be undone, so the run
    stops at once and writes nothing."""
    run = train(make_recipe(tmp_path / "run", max_steps=2))
    with pytest.raises(TrainingStopped, match="train.rollback=false cannot undo it"):
        train(make_recipe(run, optim={"lr": 1e10}, max_steps=4, rollback=False))
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    assert_every_checkpoint_good(run)


def test_bad_steps_are_counted_in_a_row(tmp_path, capsys):
    """``train.max_nonfinite`` counts bad steps in a row: isolated NaN batches, more of them in all than the limit,
    never stop a run that recovers in between."""

    def poisoned_trainer(max_nonfinite: int) -> Trainer:
        recipe = make_recipe(tmp_path / "run", max_steps=6, checkpoint_every=6, max_nonfinite=max_nonfinite)
        trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
        stream = trainer.batches
        for step in (1, 3):  # a sample of steps 2 and 4
            stream.dataset.images[stream.index_stream.indices(step * stream.batch_size, 1)[0]] = float("nan")
        return trainer

    with pytest.raises(TrainingStopped, match="Step 2: non-finite loss"):  # the limit 0 stops at the first ...
        poisoned_trainer(0).fit()
    run = poisoned_trainer(1).fit()  # ... 1 tolerates two bad steps that are not in a row
    assert json.loads((run / "run_summary.json").read_text())["nonfinite_steps"] == 2
    assert "Step 4: non-finite loss" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Saves check the weights first
# ---------------------------------------------------------------------------------------------------------------------


def test_a_save_refuses_non_finite_weights(tmp_path):
    """Whatever made them bad (here: an EMA shadow corrupted in memory), a checkpoint with a NaN is never written:
    the final save refuses with the newest good checkpoint named."""
    run = train(make_recipe(tmp_path / "run", max_steps=2, ema_decay=0.9))
    recipe = make_recipe(run, max_steps=3, ema_decay=0.9)
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    trainer.train_step()
    next(iter(trainer.ema.shadow["student"].values()))[0] = float("nan")
    with pytest.raises(TrainingStopped) as err:
        trainer.fit()
    message = str(err.value)
    assert "Refusing to save step 3" in message and "ema/student: max |w| = nan" in message
    assert str(checkpoint_dir(run, 2)) in message
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    assert_every_checkpoint_good(run)


# ---------------------------------------------------------------------------------------------------------------------
# Emergency checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def image_folder(path: Path, count: int, broken: int) -> Path:
    path.mkdir()
    rng = np.random.RandomState(0)
    with open(path / "metadata.jsonl", "w") as meta:
        for i in range(count):
            Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(path / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "text": f"noise {i}"}) + "\n")
    good = (path / f"{broken}.png").read_bytes()
    (path / f"{broken}.png").write_bytes(b"not a png")
    (path / "good.bin").write_bytes(good)
    return path


def test_a_failure_in_the_loop_writes_an_emergency_checkpoint(tmp_path, monkeypatch, capsys):
    """A data file that cannot be read at step 3 used to lose every step since the last checkpoint. The loop writes
    step 2 before the error propagates (the failed step's batch is read again on resume), and the run continues from
    it once the file is fixed."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", count=4, broken=2)
    data = recipe_data(tmp_path / "run", max_steps=4, checkpoint_every=100)
    data["teacher"] = {"pretrained": "tiny:sd15"}
    data["data"] = {"source": "image_folder", "path": str(folder), "resolution": 16, "batch_size": 1, "shuffle": False}
    with pytest.raises(Exception) as err:
        train(validate_recipe(data))
    assert not isinstance(err.value, TrainingStopped)
    ckpt = checkpoint_dir(tmp_path / "run", 2)
    assert latest_checkpoint(tmp_path / "run") == ckpt
    assert f"during step 3: wrote an emergency checkpoint of step 2 to {ckpt}" in capsys.readouterr().err
    assert json.loads((ckpt / "state.json").read_text())["data_position"] == 2

    (folder / "2.png").write_bytes((folder / "good.bin").read_bytes())
    run = train(validate_recipe(data))
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(ckpt) and summary["step"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Recipes refuse infinite and NaN numbers
# ---------------------------------------------------------------------------------------------------------------------


def test_recipes_refuse_infinite_and_nan_numbers(tmp_path):
    """``optim.lr: .inf`` used to train NaN weights with exit 0. Every infinite or NaN number, in any block and in
    any spelling (YAML ``.inf`` / ``-.inf`` / ``.nan``, an override, a quoted string), is a recipe error naming its
    key, all reported at once."""
    text = dump_recipe(make_recipe(tmp_path / "run"))
    text = text.replace("lr: 0.001", "lr: .inf").replace("weight_decay: 0.01", "weight_decay: .nan")
    text = text.replace("guidance_scale: 1.0", "guidance_scale: -.inf")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    overrides = ["objective.cond_dropout=.nan", "train.max_weight_abs=inf", "optim.betas=[0.9, inf]"]
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path), overrides)
    found = {issue.path: issue for issue in err.value.issues}
    for key in ("optim.lr", "optim.weight_decay", "optim.betas[1]", "teacher.guidance_scale", "train.max_weight_abs"):
        assert found[key].message == "should be a finite number", str(found[key])
    assert "got nan" in str(found["objective.cond_dropout"])  # its own bound (<= 1) refuses NaN first

    result = fewstep_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "optim.lr: should be a finite number; got inf" in result.stderr
    assert "Traceback" not in result.stderr


def test_objective_configs_refuse_non_finite_numbers():
    """Objective blocks are the objectives' own pydantic models; the schema walks them too (here LCM's Huber c)."""
    data = recipe_data(Path("runs/x"))
    data["objective"] = {"name": "lcm", "huber_c": math.inf}
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    assert [str(i) for i in err.value.issues] == ["objective.huber_c: should be a finite number; got inf"]


# ---------------------------------------------------------------------------------------------------------------------
# The copy behind the rollback and the per-step check
# ---------------------------------------------------------------------------------------------------------------------


def test_flat_copy_restores_every_tensor_bit_for_bit():
    """The rollback's copy covers mixed dtypes, a non-contiguous tensor and a tensor whose storage was replaced
    between steps (its views are rebuilt), and writes every value back exactly."""
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(4, 3).t(), torch.randn(2, 2, 2)]
    copy = FlatCopy(tensors)
    before = [t.clone() for t in tensors]
    copy.take()
    for t in tensors:
        t.mul_(1e6).add_(float("nan"))
    copy.restore()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))

    tensors[0].data = torch.randn(3, 4)  # new storage: the next take must follow it
    before = [t.clone() for t in tensors]
    copy.take()
    tensors[0].fill_(float("inf"))
    copy.restore()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def test_weight_check_sees_nan_inf_and_the_largest_weight():
    weights = [torch.zeros(10), torch.full((3, 3), -2.5), torch.zeros(4, dtype=torch.float64)]
    check = WeightCheck(weights)
    assert check.max_abs() == 2.5
    weights[2][1] = -7.0
    assert check.max_abs() == 7.0
    weights[0][3] = float("-inf")
    assert check.max_abs() == math.inf
    weights[1][0, 0] = float("nan")
    assert math.isnan(check.max_abs())
