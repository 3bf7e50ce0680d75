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
    run = trainer.fit()

    weights = [load_trainable_weights(checkpoint_dir(run, s))["student"] for s in (2, 3, 4)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "step 3 must not update"
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "step 4 trains again"
    adam_steps = [
        torch.load(checkpoint_dir(run, s) / "optimizers" / "student.pt", weights_only=False)["optimizer"]["state"]
        for s in (2, 3)
    ]
    assert float(adam_steps[0][0]["step"]) == float(adam_steps[1][0]["step"]) == 2.0
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["step"] == 4
    assert "Step 3: non-finite loss" in capsys.readouterr().err


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
