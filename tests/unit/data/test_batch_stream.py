"""The trainer's batch stream: exact resume from a position, disjoint rank shards, digits conditioning."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

import fewstep.models.backbones  # noqa: F401  (registers the "unet2d" adapter)
from fewstep.config.schema import DataConfig
from fewstep.data.loader import BatchStream, IndexStream, epoch_order
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.teacher import Teacher
from fewstep.noise.schedules import FlowSchedule

NUM_TRAIN = 1617


def digits_teacher(class_conditional: bool = True) -> Teacher:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=11 if class_conditional else None,
    )  # fmt: skip
    null = Conditioning(class_labels=torch.tensor([10])) if class_conditional else None
    return Teacher(Denoiser(unet, FlowSchedule(), "flow", "unet2d"), null_cond=null, family="unet2d")


def stream(batch_size: int, start: int = 0, rank: int = 0, world: int = 1, **data) -> BatchStream:
    cfg = DataConfig(source="digits", batch_size=batch_size, **data)
    return BatchStream(cfg, digits_teacher(), rank=rank, world_size=world, start_position=start, seed=3)


def test_epoch_orders_are_seeded_permutations():
    a, b = epoch_order(100, 0, seed=1), epoch_order(100, 1, seed=1)
    assert sorted(a.tolist()) == list(range(100)) and not torch.equal(a, b)
    assert torch.equal(a, epoch_order(100, 0, seed=1)) and not torch.equal(a, epoch_order(100, 0, seed=2))
    assert epoch_order(5, 3, seed=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    # Positions run through consecutive epochs: each epoch visits every index exactly once.
    idx = IndexStream(7, seed=0, shuffle=True).indices(0, 21)
    assert all(sorted(idx[e * 7 : (e + 1) * 7]) == list(range(7)) for e in range(3))


def test_resume_at_any_position_gives_the_same_sequence():
    batch = 500  # batches 3 and 4 cross the epoch boundary at 1617
    full = stream(batch)
    reference = [next(full) for _ in range(6)]
    assert full.position == 6 * batch
    resumed = stream(batch, start=2 * batch)
    for expected in reference[2:]:
        got = next(resumed)
        assert torch.equal(got.x0, expected.x0)
        assert torch.equal(got.cond.class_labels, expected.cond.class_labels)


def test_ranks_take_disjoint_shards():
    batch, steps = 7, NUM_TRAIN // 14
    ranks = [stream(batch, rank=r, world=2) for r in (0, 1)]
    seen: list[int] = []
    for _ in range(steps):
        for s in ranks:
            start = s.position + s.rank * s.batch_size
            seen += s.index_stream.indices(start, batch)
            next(s)
    assert len(seen) == len(set(seen)) == steps * 14, "a sample was drawn twice within one epoch"
    assert ranks[0].position == ranks[1].position == steps * 14  # the position counts both ranks


def test_digits_batches_carry_labels_and_the_null_class():
    s = stream(16, shuffle=False)
    batch = next(s)
    assert torch.equal(batch.x0, s.dataset.images[:16])
    assert torch.equal(batch.cond.class_labels, s.dataset.labels[:16])
    assert batch.uncond.class_labels.tolist() == [10] * 16
    preview = s.preview(12)
    assert preview.cond.class_labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert s.position == 16, "preview must not move the stream"

    unconditional = BatchStream(DataConfig(source="digits", batch_size=4), digits_teacher(False))
    batch = next(unconditional)
    assert batch.cond.batch_size is None and batch.uncond is None and batch.x0.shape == (4, 1, 8, 8)
