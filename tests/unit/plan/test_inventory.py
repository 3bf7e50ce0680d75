"""The planner's static bytes equal the real run's, byte for byte: every distinct parameter and buffer storage of the
built models, and per optimizer its parameters, their gradients after a real backward and AdamW's state after a real
step (counted on the meta device by the planner, on the real tiny models here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.plan import plan_recipe
from fewstep.plan.inventory import adamw_state_bytes, ema_bytes, gradient_bytes
from fewstep.train.build import build_components
from fewstep.train.loop import Trainer, make_accelerator


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_modules(trainer: Trainer) -> list[nn.Module]:
    """Every network of the run, found without the planner's walk: the pipeline's components, the teacher, the
    trained groups and their auxiliary modules, and the modules the objective keeps in its attributes."""
    objective = trainer.objective
    modules = [m for m in trainer.teacher.pipeline.components.values() if isinstance(m, nn.Module)]
    modules += [trainer.teacher.denoiser, *objective.trainable().values(), *objective.auxiliary().values()]
    for value in vars(objective).values():
        items = value if isinstance(value, list | tuple) else [value]
        modules += [m for m in items if isinstance(m, nn.Module)]
    return modules


def distinct_storage_bytes(modules: list[nn.Module]) -> int:
    storages = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("digits_lora", {}), ("sd15_dmd2", {"dtype": "bfloat16", "resolution": 16}), ("digits_lcm_full", {})],
)
def test_static_bytes_equal_the_built_run(recipe_of, name, kwargs):
    recipe = recipe_of(name, **kwargs)
    plan = plan_recipe(recipe, device="cpu")
    trainer = Trainer(recipe, make_accelerator(recipe), build_components(recipe))
    try:
        planned = sum(r.params.bytes + r.buffers.bytes for r in plan.roles)
        assert planned == distinct_storage_bytes(run_modules(trainer))
        assert set(plan.groups) == set(trainer.optimizers)
        for step, (group, optimizer) in enumerate(trainer.optimizers.items()):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            assert plan.groups[group].bytes == nbytes(params)
            assert plan.groups[group].count == len(params)
            batch = next(trainer.batches)
            trainer.objective.loss(batch, step, group).loss.backward()
            assert gradient_bytes(plan.groups[group]) == nbytes(p.grad for p in params if p.grad is not None)
            optimizer.step()
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            assert adamw_state_bytes(plan.groups[group], device="cpu") == nbytes(state)
            optimizer.zero_grad(set_to_none=True)
        shadows = [t for d in trainer.ema.shadow.values() for t in d.values()] if trainer.ema is not None else []
        assert ema_bytes(plan.groups, recipe) == nbytes(shadows)
    finally:
        trainer.release_run_dir()


def test_roles_name_who_owns_what(recipe_of):
    """DMD2 with two adapters on one base: the base is the teacher's (once, in its bf16), each adapter its group's,
    in fp32; the LCM target is a frozen copy the objective holds."""
    roles = {r.name: r for r in plan_recipe(recipe_of("sd15_dmd2", dtype="bfloat16"), device="cpu").roles}
    assert roles["teacher"].kind == "frozen" and roles["teacher"].params.bytes == 2 * roles["teacher"].params.numel
    assert roles["student"].params.bytes == 4 * roles["student"].params.numel
    assert roles["fake_score"].group == "fake_score"
    assert {"vae", "text_encoder"} <= {n for n, r in roles.items() if r.kind == "encoder"}
    lcm = {r.name: r for r in plan_recipe(recipe_of("digits_lcm_full"), device="cpu").roles}
    assert lcm["objective.target"].kind == "frozen"
    assert lcm["objective.target"].params.numel == lcm["student"].params.numel == lcm["teacher"].params.numel
