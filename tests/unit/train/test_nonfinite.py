"""Bad steps: a non-finite loss skips the update, an exploding update is undone; both are counted, and past
``train.max_nonfinite`` of them in a row the run stops with advice."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.train.build import build_components
from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from fewstep.train.loop import Trainer, make_accelerator, train


def test_nan_in_data_skips_that_update(make_recipe, tmp_path, capsys):
    recipe = make_recipe(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 1, "max_nonfinite": 1})
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    stream = trainer.batches
    poisoned = stream.index_stream.indices(2 * stream.batch_size, 1)[0]  # first sample of the third step
    stream.dataset.images[poisoned] = float("nan")
    student = trainer.acc.unwrap_model(trainer.modules["student"])
    weights, adam_steps = [], []
    for _ in range(4):
        trainer.train_step()
        weights.append({k: v.clone() for k, v in trainer_weights(student).items()})
        adam_steps.append(float(next(iter(trainer.optimizers["student"].state.values()))["step"]))
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "step 3 must not update"
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "step 4 trains again"
    assert adam_steps == [1.0, 2.0, 2.0, 3.0]
    assert trainer.nonfinite_steps == 1 and trainer.bad_streak == 0
    assert "Step 3: non-finite loss" in capsys.readouterr().err

    run = trainer.fit()  # the last step was good: saved
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["step"] == 4
    saved = load_trainable_weights(checkpoint_dir(run, 4))["student"]
    assert all(torch.equal(saved[k], weights[3][k]) for k in weights[3])


def trainer_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}


def test_too_many_nonfinite_steps_stop_the_run(make_recipe, tmp_path):
    # A huge learning rate without clipping blows the weights up at every update: each is undone.
    recipe = make_recipe(
        tmp_path / "run",
        optim={"lr": 1e30, "grad_clip": None, "lr_scheduler": "constant", "warmup_steps": 0},
        train={"max_steps": 20, "max_nonfinite": 2},
    )
    with pytest.raises(RuntimeError) as err:
        train(recipe)
    message = str(err.value)
    assert "Step 3:" in message and "3 bad in a row" in message and "max_nonfinite=2" in message
    assert "max |w| = 1" in message and "e+30" in message and "max_weight_abs=10000" in message
    assert "lower optim.lr" in message and "grad_clip" in message and "mixed_precision=no" in message
