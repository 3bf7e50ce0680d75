"""WebDataset shards: shard lists and counts, exact resume from a position (one and two ranks), damaged samples skipped
and counted, video clips, writing shards from an image folder, and training from shards with the real trainer."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.config import validate_recipe
from fewstep.config.schema import DataConfig
from fewstep.data.loader import build_batches
from fewstep.data.shards import (
    buffer_order,
    index_shards,
    iter_samples,
    list_shards,
    read_plan,
    scan_shard,
    write_shards,
)
from fewstep.data.webdataset import SampleError, ShardStream, decode_sample
from fewstep.models.loading import load_teacher
from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from fewstep.train.loop import train
from tests.helpers import captioned_noise_images, digits_lora_recipe

wds = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def sd15():
    cfg = SimpleNamespace(pretrained="tiny:sd15", family="auto", dtype="float32", guidance_scale=1.0)
    return load_teacher(SimpleNamespace(**vars(cfg), revision=None, variant=None))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """23 captioned noise images in shards of 5 (the last holds 3)."""
    root = tmp_path_factory.mktemp("wds")
    (root / "images").mkdir()
    write_shards(captioned_noise_images(root / "images", count=23), root / "shards", shard_size=5)
    return root / "shards"


def stream(shards: Path, teacher, start: int = 0, rank: int = 0, world: int = 1, **data) -> ShardStream:
    cfg = DataConfig(source="webdataset", path=str(shards), resolution=16, **{"batch_size": 3, **data})
    accelerator = SimpleNamespace(device="cpu", process_index=rank, num_processes=world)
    return build_batches(cfg, teacher, accelerator, start_position=start, seed=7)


def test_shard_lists_counts_and_the_index_cache(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    listed = list_shards(str(shards))
    assert [p.name for p in listed] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert list_shards(str(shards / "shard-{000001..000003}.tar")) == listed[1:4]
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in listed[:2]) + "\n# a comment\n")
    assert list_shards([str(tmp_path / "list.txt"), str(listed[4])]) == [*listed[:2], listed[4]]
    with pytest.raises(FileNotFoundError, match="do not exist: .*shard-000005.tar.* and 2 more"):
        list_shards(str(shards / "shard-{000004..000009}.tar"))
    with pytest.raises(ValueError, match="local or mounted"):
        list_shards("https://example.com/shard-{0..3}.tar")

    assert json.loads((shards / "counts.json").read_text()) == {p.name: n for p, n in zip(listed, [5, 5, 5, 5, 3])}
    assert index_shards(listed).counts == [5, 5, 5, 5, 3]  # from counts.json: no pass over the tars
    copy = tmp_path / "copy"  # the same shards without counts.json: one header pass, then the cache
    copy.mkdir()
    for p in listed:
        (copy / p.name).write_bytes(p.read_bytes())
    index = index_shards(sorted(copy.glob("*.tar")), sizes=True)
    assert index.counts == [5, 5, 5, 5, 3] and index.sizes[0] == [(16, 16)] * 5
    cached = list((tmp_path / "cache" / "shards").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["counts"] == [5, 5, 5, 5, 3]
    assert index_shards(sorted(copy.glob("*.tar")), sizes=True) == index


def test_buffer_order_and_reading_a_plan_from_any_point(shards):
    for n, buffer in ((10, 1), (10, 4), (10, 100), (0, 3)):
        order = buffer_order(n, buffer, random.Random(1))
        assert sorted(order) == list(range(n)) and order == buffer_order(n, buffer, random.Random(1))
    assert buffer_order(10, 1, random.Random(1)) == list(range(10))  # a buffer of one does not shuffle
    assert buffer_order(10, 3, random.Random(1)) != list(range(10))

    shard = list_shards(str(shards))[0]
    keys = [s["__key__"] for s in iter_samples(shard)]
    assert keys == [f"{i:08d}" for i in range(5)]
    plan = [3, 0, 4, 0, 1, 2]  # repeats allowed
    got = [s["__key__"] for s in read_plan(shard, plan, offset=2)]
    assert got == [keys[i] for i in plan[2:]]
    missing = list(read_plan(shard, [1, 7], 0))  # a sample the shard does not hold comes as None
    assert missing[0]["__key__"] == keys[1] and missing[1] is None


def test_resume_at_a_position_continues_the_stream_exactly(shards, sd15):
    full = stream(shards, sd15)
    assert full.epoch_samples == 23
    reference = [next(full) for _ in range(10)]  # 30 samples: across the epoch boundary at 23
    keys = [k for b in reference for k in b.extra["keys"]]
    assert sorted(keys[:23]) == sorted({k for k in keys[:23]}), "an epoch repeats a sample"
    assert keys[23:] != keys[:7], "the second epoch has its own order"
    for k in (3, 8):  # inside epoch 0, and inside epoch 1
        resumed = stream(shards, sd15, start=3 * k)
        state = resumed.stream_state()  # the shard and the place in its plan the next sample comes from
        plan = resumed.shard_plan(state["epoch"], resumed.shard_ids.index(state["shard"]))
        assert state["epoch"] == 3 * k // 23
        shard = resumed.shards[resumed.shard_ids.index(state["shard"])]
        in_file_order = [sample["__key__"] for sample in iter_samples(shard)]
        assert reference[k].extra["keys"][0] == f"{shard.name}/{in_file_order[plan[state['offset']][0]]}"
        for expected in reference[k:]:
            got = next(resumed)
            assert got.extra["keys"] == expected.extra["keys"]
            assert torch.equal(got.x0, expected.x0)
            assert torch.equal(got.cond.prompt_embeds, expected.cond.prompt_embeds)
    preview = full.preview(4)  # the first samples in file order, for sample grids; the stream does not move
    assert preview.extra["labels"] == ["pattern 0", "pattern 1", "pattern 2", "pattern 3"]
    assert preview.x0.shape == (4, 4, 8, 8) and full.position == 30


def test_two_ranks_read_disjoint_shards_and_resume_exactly(shards, sd15):
    ranks = [stream(shards, sd15, rank=r, world=2, batch_size=2) for r in (0, 1)]
    assert [s.shard_ids for s in ranks] == [[0, 2, 4], [1, 3]] and [s.epoch_samples for s in ranks] == [13, 10]
    seen = [[k for _ in range(5) for k in next(s).extra["keys"]] for s in ranks]  # 10 samples each: one epoch of 1
    assert not {k.split("/")[0] for k in seen[0]} & {k.split("/")[0] for k in seen[1]}, "ranks share a shard"
    assert len(set(seen[1])) == 10 and len(set(seen[0])) == 10
    assert ranks[0].position == ranks[1].position == 5 * 2 * 2
    later = [[next(s) for _ in range(4)] for s in ranks]
    for r in (0, 1):
        resumed = stream(shards, sd15, start=20, rank=r, world=2, batch_size=2)
        for expected in later[r]:
            got = next(resumed)
            assert got.extra["keys"] == expected.extra["keys"] and torch.equal(got.x0, expected.x0)
    with pytest.raises(ValueError, match="5 shard.* for 6 processes"):
        stream(shards, sd15, rank=5, world=6)


def broken_shards(root: Path) -> Path:
    """One shard of 6 samples: good, a truncated PNG, good, no caption, good, a PNG that is not an image."""
    rng = np.random.default_rng(0)
    out = root / "broken"
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(6):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            png = buffer.getvalue()
            sample = {"__key__": f"{i:04d}", "png": png, "txt": f"noise {i}"}
            if i == 1:
                sample["png"] = png[: len(png) // 2]
            if i == 3:
                del sample["txt"]
            if i == 5:
                sample["png"] = b"not an image"
            sink.write(sample)
    return out


def test_damaged_samples_are_skipped_counted_and_replaced(tmp_path, sd15):
    out = broken_shards(tmp_path)
    shard = out / "shard-000000.tar"
    with pytest.raises(SampleError, match="could not be decoded"):
        decode_sample(next(s for s in iter_samples(shard) if s["__key__"] == "0001"), 16)
    s = stream(out, sd15, batch_size=3, shuffle=False)
    first, second = next(s), next(s)
    assert s.skipped == 3 and s.position == 6
    # every place of a batch is filled: a skipped sample's place takes the batch's first good one
    assert first.extra["keys"] == ["shard-000000.tar/0000", "shard-000000.tar/0000", "shard-000000.tar/0002"]
    assert second.extra["keys"] == ["shard-000000.tar/0004", "shard-000000.tar/0004", "shard-000000.tar/0004"]
    assert torch.equal(first.x0[0], first.x0[1]) and first.x0.shape == (3, 4, 8, 8)
    next(s)  # the next epoch goes on
    assert s.skipped == 4

    # A batch with no good sample takes the stream's next good one; the truncated tar's lost samples are skipped.
    with tarfile.open(shard) as tar:
        cut = tar.getmember("0003.png").offset_data + 10
    shard.write_bytes(shard.read_bytes()[:cut])  # the tar ends inside sample 3 (of 0..5)
    (out / "counts.json").write_text(json.dumps({"shard-000000.tar": 6}))  # still counted as 6
    s = stream(out, sd15, batch_size=1, shuffle=False)
    keys = [next(s).extra["keys"][0] for _ in range(6)]
    assert (
        keys
        == ["shard-000000.tar/0000", "shard-000000.tar/0002", "shard-000000.tar/0002"] + ["shard-000000.tar/0000"] * 3
    )
    assert s.skipped == 4  # the truncated PNG, and the 3 samples the cut tar no longer holds


def test_training_logs_skipped_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = broken_shards(tmp_path)
    recipe = digits_lora_recipe(tmp_path / "run", max_steps=2, checkpoint_every=2, log_every=1)
    recipe["teacher"] = {"pretrained": "tiny:sd15"}
    recipe["data"] = {"source": "webdataset", "path": str(out), "resolution": 16, "batch_size": 3, "shuffle": False}
    run = train(validate_recipe(recipe))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "fewstep").glob("events.out.tfevents.*"))))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("data/skipped")] == [(1, 1.0), (2, 3.0)]
    state = json.loads((checkpoint_dir(run, 2) / "state.json").read_text())
    assert state["data_position"] == 6 and state["data_state"] == {"epoch": 1, "shard": 0, "offset": 0}


def digit_images(folder: Path, count: int) -> Path:
    """``count`` digits from scikit-learn as 16×16 RGB PNGs, captioned "a handwritten digit <d>"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").resize((16, 16), Image.Resampling.NEAREST).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {digits.target[i]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_train_from_digit_shards_and_resume_exactly(tmp_path, monkeypatch):
    """tiny:sd15 trains 3 steps from shards of real digits; a run stopped at step 2 and resumed ends with the same
    weights, bit for bit (its stream restarted inside a shard)."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    write_shards(digit_images(tmp_path / "digits", 14), tmp_path / "shards", shard_size=4)
    (tmp_path / "shards" / "counts.json").unlink()  # the stream indexes the tars itself

    def recipe(out: Path, steps: int):
        data = digits_lora_recipe(out, max_steps=steps, checkpoint_every=1)
        data["teacher"] = {"pretrained": "tiny:sd15"}
        data["data"] = {"source": "webdataset", "path": str(tmp_path / "shards/shard-{000000..000003}.tar"),
                        "resolution": 16, "batch_size": 3, "shuffle_buffer": 3}  # fmt: skip
        return validate_recipe(data)

    straight = train(recipe(tmp_path / "straight", 3))
    train(recipe(tmp_path / "resumed", 2))
    resumed = train(recipe(tmp_path / "resumed", 3))
    a = load_trainable_weights(checkpoint_dir(straight, 3))["student"]
    b = load_trainable_weights(checkpoint_dir(resumed, 3))["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_trainable_weights(checkpoint_dir(straight, 1))["student"]
    assert any(not torch.equal(first[k], a[k]) for k in a), "the weights did not move"
    state = json.loads((checkpoint_dir(resumed, 2) / "state.json").read_text())["data_state"]
    assert state == {"epoch": 0, "shard": 1, "offset": 2}  # 6 of 14 samples: shards 0 then 1 (4 each) this epoch


def test_data_verb_writes_shards(tmp_path, monkeypatch, capsys):
    from fewstep.cli.main import main

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    captioned_noise_images(folder, count=5)
    recipe = digits_lora_recipe(tmp_path / "run")
    recipe["teacher"] = {"pretrained": "tiny:sd15"}
    recipe["data"] = {"source": "image_folder", "path": str(folder), "resolution": 16}
    file = tmp_path / "recipe.yaml"
    file.write_text(json.dumps(recipe))
    assert main(["data", str(file), "--to-shards", str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    assert "shards: 3 in" in capsys.readouterr().out
    assert index_shards(list_shards(str(tmp_path / "shards"))).counts == [2, 2, 1]
    sample = next(iter_samples(tmp_path / "shards" / "shard-000000.tar"))
    assert sample["txt"] == b"pattern 0" and json.loads(sample["json"])["file_name"] == "0.png"
    assert main(["data", str(file), "--to-shards", str(tmp_path / "shards")]) == 2  # nothing is overwritten
    assert "holds .tar shards already" in capsys.readouterr().err

    recipe["data"] = {"source": "webdataset", "path": str(tmp_path / "nowhere/x-{0..2}.tar"), "resolution": 16}
    file.write_text(json.dumps(recipe))
    assert main(["validate", str(file)]) == 2
    assert "data.path: names shards that do not exist" in capsys.readouterr().err


def test_video_clips(tmp_path, sd15):
    av = pytest.importorskip("av")
    del av
    from fewstep.data.video import write_video

    frames = np.stack([np.full((16, 24, 3), 20 * i, dtype=np.uint8) for i in range(7)])  # brightness = frame index
    clip = write_video(frames, tmp_path / "clip.mp4", fps=8).read_bytes()
    sample = {"__key__": "0", "mp4": clip, "json": json.dumps({"text": "getting brighter"}).encode()}
    pixels, caption = decode_sample(sample, 16, num_frames=3, frame_stride=2)
    assert pixels.shape == (3, 3, 16, 16) and caption == "getting brighter"
    brightness = ((pixels.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()  # frames 0, 2, 4
    assert brightness == pytest.approx([0, 40, 80], abs=3)
    with pytest.raises(SampleError, match="has 7 frames, 4 at stride 2; 5 are needed"):
        decode_sample(sample, 16, num_frames=5, frame_stride=2)
    with pytest.raises(SampleError, match="video could not be decoded"):
        decode_sample({**sample, "mp4": clip[:200]}, 16, num_frames=2)
    with pytest.raises(SampleError, match="has no video"):
        decode_sample({"__key__": "0", "png": b"", "txt": b"x"}, 16, num_frames=2)

    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        info = tarfile.TarInfo("0.mp4")
        info.size = len(clip)
        tar.addfile(info, io.BytesIO(clip))
    assert scan_shard(tmp_path / "v.tar", sizes=True) == [(16, 24)]
    with pytest.raises(ValueError, match="is an image model; video shards need a video teacher"):
        stream(tmp_path / "v.tar", sd15, num_frames=3)


def test_a_streaming_source_keeps_a_bounded_number_of_captions(sd15):
    from fewstep.data.loader import PromptCache

    cache = PromptCache(sd15, max_prompts=2)
    first, _ = cache(["a", "b", "c"])
    assert list(cache._rows) == ["b", "c"]  # the oldest went
    again, _ = cache(["a"])  # encoded again, the same
    assert torch.allclose(again.prompt_embeds, first.prompt_embeds[:1], atol=1e-6)
