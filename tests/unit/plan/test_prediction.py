"""The whole step's per-rank peak as planned vs as measured on a single-process CPU run of the real trainer.

Measured: every CPU tensor storage alive before a step (``tensor_bytes_alive``: weights, optimizer state, EMA, the
step guard's copies, data) plus the largest increase during the step (``LiveTensorBytes``), over a few steps after
the first (AdamW's state exists from each group's first step). That is the CPU analogue of
``torch.cuda.max_memory_allocated``, without the process's allocator slack or library memory.
"""

from __future__ import annotations

import pytest

from fewstep.plan import layout_by_name, plan_recipe
from fewstep.plan.measure import LiveTensorBytes, tensor_bytes_alive
from fewstep.train.build import build_components
from fewstep.train.loop import Trainer, make_accelerator


def measured_peak(recipe, steps: int = 4) -> int:
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    try:
        trainer.train_step()  # warm-up: lazy state (AdamW moments, the guard's copies) appears in the first steps
        peak = 0
        for _ in range(steps):
            before = tensor_bytes_alive()
            with LiveTensorBytes() as live:
                trainer.train_step()
            peak = max(peak, before + live.peak)
        return peak
    finally:
        trainer.release_run_dir()


@pytest.mark.parametrize(("name", "kwargs"), [("digits_lora", {"batch_size": 64}), ("sd15_dmd2", {"resolution": 64})])
def test_whole_step_within_20_percent(recipe_of, name, kwargs):
    recipe = recipe_of(name, **kwargs)
    predicted = layout_by_name(plan_recipe(recipe, device="cpu"), "ddp").total_bytes
    measured = measured_peak(recipe)
    assert abs(predicted - measured) <= 0.2 * measured, (predicted / 2**20, measured / 2**20)


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing(recipe_of):
    plan = plan_recipe(recipe_of("sd15_dmd2", batch_size=2), device="cpu")
    double = plan_recipe(recipe_of("sd15_dmd2", batch_size=4), device="cpu")
    one, two = plan.activations[False].graph_bytes, double.activations[False].graph_bytes
    assert two == pytest.approx(2 * one, rel=1e-3)
    assert plan.activations[True].graph_bytes < 0.3 * one
    plain, ckpt = layout_by_name(plan, "ddp"), layout_by_name(plan, "ddp+ckpt")
    assert ckpt.static_bytes == plain.static_bytes and ckpt.step_bytes < plain.step_bytes
