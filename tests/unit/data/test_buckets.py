"""Aspect-ratio buckets: presets, the nearest bucket, the pixel-multiple rule, the one resize/crop, the bucket sampler
(one shape per batch, exact resume, two ranks) for image folders and WebDataset shards, and SDXL's size ids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.config import validate_recipe
from fewstep.config.errors import RecipeError
from fewstep.config.schema import DataConfig
from fewstep.data.buckets import PRESETS, BucketSampler, check_buckets, nearest_bucket, resolve_buckets
from fewstep.data.image_folder import crop_to
from fewstep.data.loader import BatchStream, build_batches
from fewstep.models.backbones import pixel_multiple
from fewstep.models.loading import load_teacher
from tests.helpers import digits_lora_recipe

BUCKETS = [[16, 16], [16, 32], [32, 16]]  # square, wide, tall (tiny models: sides multiples of 2 or 4)
SIZES = [(16, 16), (14, 30), (36, 18), (20, 20), (16, 40), (30, 16), (18, 17), (12, 30), (40, 20)]  # (h, w)
BUCKET_OF = [0, 1, 2, 0, 1, 2, 0, 1, 2]


def teacher(family: str):
    cfg = SimpleNamespace(pretrained=f"tiny:{family}", family="auto", dtype="float32", guidance_scale=1.0)
    return load_teacher(SimpleNamespace(**vars(cfg), revision=None, variant=None))


@pytest.fixture(scope="module")
def sd15():
    return teacher("sd15")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Nine noise images of three aspect ratios, captioned "shape i"."""
    root = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"shape {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_presets_and_the_nearest_bucket():
    sdxl = resolve_buckets("sdxl")
    assert len(sdxl) == 41 and (1024, 1024) in sdxl and sdxl == list(PRESETS["sdxl"])
    assert all(h % 64 == 0 and w % 64 == 0 and 0.9 <= h * w / 1024**2 <= 1 for h, w in sdxl)
    assert sorted(sdxl) == sorted((w, h) for h, w in sdxl)  # every landscape shape has its portrait twin
    assert resolve_buckets("sd15") == [(h // 2, w // 2) for h, w in sdxl]
    assert resolve_buckets([[16, 32]]) == [(16, 32)]
    with pytest.raises(ValueError, match="presets: sdxl, sd15"):
        resolve_buckets("sd21")

    assert [nearest_bucket(h, w, resolve_buckets(BUCKETS)) for h, w in SIZES] == BUCKET_OF
    assert nearest_bucket(10, round(10 * math.sqrt(2)), [(16, 16), (16, 32)]) == 0  # a tie goes to the first
    assert sdxl[nearest_bucket(1000, 1500, sdxl)] == (832, 1216)  # 1.50 → 1.46, the nearest ratio


def test_buckets_must_be_multiples_of_the_vae_factor_times_the_patch_size(sd15, folder):
    assert pixel_multiple(sd15) == 2  # the tiny VAE halves; a UNet takes latents as they are
    assert pixel_multiple(teacher("sd3")) == 4  # ... and SD3 patchifies 2×2
    with pytest.raises(ValueError) as err:
        check_buckets([(16, 16), (18, 16), (17, 40)], 4, "why")
    assert str(err.value) == (
        "data.buckets.1: [18, 16] has a side that is not a multiple of 4; use [16, 16]; "
        "data.buckets.2: [17, 40] has a side that is not a multiple of 4; use [16, 40]. "
        "Bucket sides must be multiples of 4 (why)."
    )
    cfg = DataConfig(source="image_folder", path=str(folder), buckets=[[16, 16], [15, 32]], batch_size=2)
    with pytest.raises(ValueError, match=r"data.buckets.1: \[15, 32\] .* multiples of 2 \(the VAE's downsampling"):
        BatchStream(cfg, sd15)


def test_one_resize_and_crop_for_every_shape():
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 255  # left half black, right half white
    image = Image.fromarray(pixels)
    assert torch.equal(crop_to(image, 8), crop_to(image, (8, 8)))
    wide = crop_to(image, (8, 16))  # the same aspect ratio: only resized
    assert wide.shape == (3, 8, 16) and float(wide[:, :, :5].max()) < -0.9 and float(wide[:, :, 11:].min()) > 0.9
    tall = crop_to(image, (16, 8))  # 32×16 covers 8×16 already: the middle 8 columns, black | white at column 4
    assert tall.shape == (3, 16, 8) and float(tall[:, :, :3].max()) < -0.9 and float(tall[:, :, 5:].min()) > 0.9


def test_the_bucket_sampler_is_a_pure_function_of_seed_and_position():
    sampler = BucketSampler([0, 0, 0, 1, 1, 2, 0, 1, 0, 0], global_batch=2, seed=3, shuffle=True)
    assert sampler.epoch_samples == 6 + 4 + 2  # every bucket filled up to whole global batches
    items = sampler.indices(0, 3 * 12)
    buckets = [[0, 0, 0, 1, 1, 2, 0, 1, 0, 0][i] for i in items]
    assert all(buckets[k] == buckets[k + 1] for k in range(0, len(items), 2)), "a global batch mixes buckets"
    assert all(set(items[e * 12 : (e + 1) * 12]) == set(range(10)) for e in range(3)), "an epoch misses an item"
    assert items[:12] != items[12:24]
    fresh = BucketSampler([0, 0, 0, 1, 1, 2, 0, 1, 0, 0], global_batch=2, seed=3, shuffle=True)
    assert fresh.indices(14, 10) == items[14:24]
    assert BucketSampler([0, 1, 0, 1], 2, seed=0, shuffle=False).indices(0, 4) == [0, 2, 1, 3]


def test_image_folder_batches_are_one_bucket_and_resume_exactly(sd15, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(source="image_folder", path=str(folder), buckets=BUCKETS, batch_size=2)
    full = BatchStream(cfg, sd15, seed=5)
    assert full.item_buckets == BUCKET_OF and full.index_stream.epoch_samples == 12
    reference = [next(full) for _ in range(9)]  # a batch of each shape; across epoch boundaries
    assert {tuple(b.x0.shape[2:]) for b in reference} == {(8, 8), (8, 16), (16, 8)}
    assert full.stream_state() == {"epoch": 1, "shard": None, "offset": 6}
    resumed = BatchStream(cfg, sd15, start_position=8, seed=5)
    for expected in reference[4:]:
        assert torch.equal(next(resumed).x0, expected.x0)

    ranks = [BatchStream(cfg, sd15, rank=r, world_size=2, seed=5) for r in (0, 1)]
    seen = set()
    for _ in range(3):  # one epoch: a global batch of 4 per bucket (its 3 images and a repeat)
        starts = [s.position + s.rank * s.batch_size for s in ranks]
        items = [i for s, start in zip(ranks, starts) for i in s.index_stream.indices(start, 2)]
        assert len({BUCKET_OF[i] for i in items}) == 1 and len(set(items)) == 3
        seen |= set(items)
        shapes = {tuple(next(s).x0.shape) for s in ranks}
        assert len(shapes) == 1, "the ranks of one step trained on different shapes"
    assert seen == set(range(9))


def test_sdxl_size_ids_follow_the_bucket(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(source="image_folder", path=str(folder), buckets=BUCKETS, batch_size=3, shuffle=False)
    s = BatchStream(cfg, teacher("sdxl"))
    for _ in range(3):
        batch = next(s)
        h, w = (side * 2 for side in batch.x0.shape[2:])  # pixels = latents × the tiny VAE's factor 2
        expected = torch.tensor([[h, w, 0, 0, h, w]] * 3, dtype=batch.cond.time_ids.dtype)
        assert torch.equal(batch.cond.time_ids.cpu(), expected) and torch.equal(batch.uncond.time_ids.cpu(), expected)


def test_webdataset_batches_are_one_bucket_and_resume_exactly(sd15, folder, tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    from fewstep.data.shards import write_shards

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    write_shards(folder, tmp_path / "shards", shard_size=5)  # 5 + 4 samples
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "shards"), buckets=BUCKETS, batch_size=2)

    def stream(start: int = 0, rank: int = 0, world: int = 1):
        accelerator = SimpleNamespace(device="cpu", process_index=rank, num_processes=world)
        return build_batches(cfg, sd15, accelerator, start_position=start, seed=2)

    full = stream()
    assert full.slots == [6, 6]  # per shard, each bucket's samples filled up to whole batches: (2+2+2), (2+2+2)
    reference = [next(full) for _ in range(9)]
    for batch in reference:
        buckets = {BUCKET_OF[int(key.split("/")[1])] for key in batch.extra["keys"]}
        assert len(buckets) == 1 and tuple(batch.x0.shape[2:]) == tuple(s // 2 for s in BUCKETS[buckets.pop()])
    for start in (2, 10):
        resumed = stream(start)
        for expected in reference[start // 2 :]:
            got = next(resumed)
            assert got.extra["keys"] == expected.extra["keys"] and torch.equal(got.x0, expected.x0)
    with pytest.raises(ValueError, match="not a whole number of batches"):
        stream(start=3)
    assert [stream(rank=r, world=2).shard_ids for r in (0, 1)] == [[0], [1]]


def test_bucket_keys_in_recipes(tmp_path):
    def errors(data: dict) -> dict[str, str]:
        recipe = digits_lora_recipe(tmp_path / "run")
        recipe["data"] = data
        with pytest.raises(RecipeError) as err:
            validate_recipe(recipe)
        return {issue.path: str(issue) for issue in err.value.issues}

    both = errors({"source": "image_folder", "path": "x", "resolution": 16, "buckets": "sdxl"})
    assert (
        list(both) == ["data.resolution"]
        and "exactly one of data.resolution or data.buckets" in both["data.resolution"]
    )
    assert "Did you mean 'sdxl'?" in errors({"source": "webdataset", "path": "x", "buckets": "sdx1"})["data.buckets"]
    frames = errors({"source": "image_folder", "path": "x", "buckets": [[5, 16, 16]]})["data.buckets"]
    assert "for video from source: webdataset" in frames
    assert (
        "all of one kind"
        in errors({"source": "webdataset", "path": "x", "buckets": [[16, 16], [4, 16, 16]]})["data.buckets"]
    )
    assert list(errors({"source": "digits", "buckets": "sdxl"})) == ["data.buckets"]
    assert (
        "only for source: webdataset" in errors({"source": "image_folder", "path": ["a"], "resolution": 8})["data.path"]
    )
    assert list(errors({"source": "fashion_mnist", "num_frames": 4})) == ["data.num_frames"]  # no video there
    ok = {"source": "webdataset", "path": ["a.tar", "b-{0..3}.tar"], "buckets": [[9, 16, 16]], "frame_stride": 2}
    recipe = digits_lora_recipe(tmp_path / "run")
    recipe["data"] = ok
    assert validate_recipe(recipe).data.buckets == [[9, 16, 16]]


def test_the_data_docs_recipes_validate():
    import yaml

    text = (Path(__file__).resolve().parents[3] / "docs" / "data.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) == 4  # shards, buckets, a video folder, data-free video
    for block in blocks:
        data = yaml.safe_load(block)["data"]
        DataConfig.model_validate(data)
