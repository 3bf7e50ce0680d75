"""One rank of a 2-process CPU (gloo) FSDP2 run of the digits teacher's UNet as a full student: ``fully_shard`` on
each block the planner wraps, then the root; one AdamW step; writes this rank's local bytes of parameters, gradients
and optimizer state to ``<out>/rank<r>.json``. Launched by ``test_fsdp.py`` with ``torch.distributed.run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import UNet2DModel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fewstep.assets import asset_path
from fewstep.plan.planner import wrap_units


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = UNet2DModel.from_pretrained(asset_path("digits-vp") / "unet").train()
    classes, _, _ = wrap_units(model)
    for module in reversed(list(model.modules())):  # inner blocks before the root
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(rank)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    model(x, t, class_labels=torch.randint(0, 10, (4,))).sample.pow(2).mean().backward()
    grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    result = {"params": local_bytes(model.parameters()), "grads": grads, "optimizer": local_bytes(state)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
