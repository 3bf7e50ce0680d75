"""sCM's JVP calls the student's backbone around DDP's wrapper; the trainer averages its gradients itself
(``fewstep.train.sync``). Under ``accelerate launch`` with two CPU processes (gloo DDP, each rank on its own data
shard) both ranks must end with identical weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.objectives.consistency.scm import SCM
from fewstep.objectives.diffusion import Diffusion
from fewstep.train.sync import average_gradients, check_engine, check_strategy
from tests.helpers import launch_two


def test_two_processes_train_identical_scm_students(make_recipe, write_recipe, tmp_path):
    run = tmp_path / "run"
    steps = 3
    objective = {"name": "scm", "tangent_warmup_steps": 2, "adaptive_weighting": True}
    recipe = write_recipe(
        make_recipe(
            run, objective=objective, data={"batch_size": 4}, train={"max_steps": steps, "checkpoint_every": steps}
        ),
        tmp_path / "recipe.yaml",
    )
    summary = launch_two(recipe, tmp_path)
    assert summary["world_size"] == 2 and summary["step"] == steps and summary["nonfinite_steps"] == 0
    prints = summary["weight_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1], "the ranks diverged: sCM's gradients were not averaged"


def test_one_process_average_is_a_no_op_and_sharding_is_refused():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    before = layer.weight.grad.clone()
    assert average_gradients(layer, SimpleNamespace(num_processes=1)) == 2
    assert torch.equal(layer.weight.grad, before)

    assert SCM.bypasses_prepared and not Diffusion.bypasses_prepared
    check_strategy(SCM, SimpleNamespace(distributed_type="DistributedType.MULTI_GPU"))  # DDP: fine
    fsdp = SimpleNamespace(distributed_type="DistributedType.FSDP")
    check_strategy(SCM, fsdp, sharded_by_fewstep=True)  # FSDP2 as fewstep applies it: every objective
    with pytest.raises(ValueError, match="FSDP cannot shard.*--multi_gpu"):
        check_strategy(SCM, fsdp)  # a wrapper FSDP (never built by the trainer) would not see the JVP

    check_engine(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU"))
    for engine in ("DEEPSPEED", "MEGATRON_LM"):
        with pytest.raises(ValueError, match="does not run under.*fsdp2_full_shard.yaml"):
            check_engine(SimpleNamespace(distributed_type=f"DistributedType.{engine}"))
