"""Precomputed caches (``fewstep.data.cache``): the batches read from a cache are the batches the source data gives
through the teacher's encoders, training from a cache loads no text encoder or VAE and ends with the same weights,
an interrupted cache resumes keeping its finished shards, and a cache made otherwise is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fewstep.config.errors import RecipeError
from fewstep.config.load import load_recipe, validate_recipe
from fewstep.data import cache as cache_module
from fewstep.data.cache import MANIFEST, NULL_FILE, CachedDataset, StaleCacheError, load_cached_teacher, open_cache
from fewstep.data.cache_writer import build_cache
from fewstep.data.loader import BatchStream
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import load_teacher
from fewstep.models.vae import decode_latents
from fewstep.train.loop import train
from tests.helpers import captioned_noise_images, fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

ATOL = 1e-6


def write_recipe(tmp_path: Path, data: dict, teacher: str = "tiny:sd15", **train_cfg) -> Path:
    """A tiny DMD2 LoRA recipe over ``data`` (batch 2, in order), 2 steps, a sample grid after each."""
    recipe = {
        "teacher": {"pretrained": teacher, "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2"},
        "data": {"batch_size": 2, "shuffle": False, **data},
        "train": {"max_steps": 2, "checkpoint_every": 2, "sample_every": 1, "sample_steps": [1],
                  "num_sample_images": 2, "progress": False, **train_cfg},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def from_cache(path: Path, cache: Path, *overrides: str):
    return load_recipe(str(path), ["data.source=cache", f"data.path={cache}", "data.resolution=null", *overrides])


def assert_same_conditioning(a: Conditioning | None, b: Conditioning | None) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert other is not None and other.dtype == value.dtype, name
            torch.testing.assert_close(other, value, atol=ATOL, rtol=0, msg=name)
        elif name != "extra":
            assert other is None, name


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    return captioned_noise_images(tmp_path / "images", count=3, size=16)


def test_cache_gives_the_folder_batches_and_trains_to_the_same_weights_without_encoders(tmp_path, folder):
    path = write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 16})
    recipe = load_recipe(str(path))
    cache = build_cache(recipe, shard_size=2, batch_size=2, progress=False)
    assert cache == folder / ".fewstep_cache"
    assert sorted(p.name for p in cache.iterdir()) == [MANIFEST, NULL_FILE, "shard-00000.safetensors",
                                                       "shard-00001.safetensors"]  # fmt: skip
    cached = from_cache(path, cache)

    teacher = load_cached_teacher(cached)
    pipe = teacher.pipeline
    assert pipe.text_encoder is None and pipe.vae is None and pipe.tokenizer is not None
    full = load_teacher(recipe.teacher)
    assert_same_conditioning(teacher.null_cond, full.null_cond)
    # the epoch wraps after 3 items: batches cross both shards and the epoch boundary
    folder_batches, cache_batches = BatchStream(recipe.data, full), BatchStream(cached.data, teacher)
    for _ in range(3):
        a, b = next(folder_batches), next(cache_batches)
        torch.testing.assert_close(b.x0, a.x0, atol=ATOL, rtol=0)
        assert_same_conditioning(a.cond, b.cond)
        assert_same_conditioning(a.uncond, b.uncond)
    assert cache_batches.preview(2).extra["labels"] == ["pattern 0", "pattern 1"]

    # decoding loads the VAE for the moment and gives what the full teacher gives
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_latents(teacher, x0), decode_latents(full, x0), atol=0, rtol=0)
    assert pipe.vae is None

    # two steps from the folder and from the cache end with the same weights; the cache run's grids are decoded
    folder_run = train(load_recipe(str(path), [f"output_dir={tmp_path / 'folder_run'}"]))
    cache_run = train(from_cache(path, cache, f"output_dir={tmp_path / 'cache_run'}"))
    fingerprints = [json.loads((run / "run_summary.json").read_text())["weight_fingerprints"]
                    for run in (folder_run, cache_run)]  # fmt: skip
    assert fingerprints[0] == fingerprints[1]
    assert (cache_run / "samples" / "step_00000002.png").is_file()


def test_prompt_cache_of_flux_keeps_every_field_and_the_teachers_guidance(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    path = write_recipe(tmp_path, {"source": "prompts", "path": str(prompts)}, teacher="tiny:flux")
    recipe = load_recipe(str(path))
    cache = build_cache(recipe, shard_size=2, progress=False)
    assert cache == tmp_path / "prompts.txt.fewstep_cache"
    shard = load_file(cache / "shard-00000.safetensors")
    assert "latents" not in shard and "cond.guidance" not in shard  # data-free; guidance is the teacher's
    assert shard["cond.txt_ids"].ndim == 2 and shard["uncond.prompt_embeds"].shape[0] == 1  # shared null row

    # another embedded guidance needs no new cache: it is the recipe's, not an encoder's
    recipe = load_recipe(str(path), ["teacher.guidance_scale=4.5"])
    cached = from_cache(path, cache, "teacher.guidance_scale=4.5")
    full, teacher = load_teacher(recipe.teacher), load_cached_teacher(cached)
    a, b = next(BatchStream(recipe.data, full)), next(BatchStream(cached.data, teacher))
    assert a.x0 is None and b.x0 is None
    assert_same_conditioning(a.cond, b.cond)
    assert_same_conditioning(a.uncond, b.uncond)
    assert float(b.cond.guidance[0]) == 4.5


def test_an_interrupted_cache_keeps_its_finished_shards(tmp_path, folder, monkeypatch):
    recipe = load_recipe(str(write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 16})))
    cache = build_cache(recipe, tmp_path / "cache", shard_size=1, progress=False)
    whole = {n: load_file(cache / n) for n in ("shard-00001.safetensors", "shard-00002.safetensors")}
    # as a run killed after its first shard leaves it: the others missing, one half-written temporary file
    for name in whole:
        (cache / name).unlink()
    (cache / "shard-00001.safetensors.abc.tmp").write_bytes(b"half")
    kept = (cache / "shard-00000.safetensors").stat()
    with pytest.raises(FileNotFoundError, match="incomplete: 2 of 4 files are missing"):
        open_cache(cache)

    build_cache(recipe, tmp_path / "cache", shard_size=1, progress=False)
    again = (cache / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten
    assert not list(cache.glob("*.tmp"))
    for name, tensors in whole.items():
        rewritten = load_file(cache / name)
        assert rewritten.keys() == tensors.keys() and all(torch.equal(rewritten[k], tensors[k]) for k in tensors)

    # read across shards with one file open at a time: the same rows
    monkeypatch.setattr(cache_module, "OPEN_SHARDS", 1)
    dataset = CachedDataset(cache)
    x0, cond, _ = dataset.batch([2, 0, 2])
    assert dataset.captions([2, 0]) == ["pattern 2", "pattern 0"]
    assert torch.equal(x0[0], x0[2]) and torch.equal(x0[1], load_file(cache / "shard-00000.safetensors")["latents"][0])
    assert torch.equal(cond.prompt_embeds[0], whole["shard-00002.safetensors"]["cond.prompt_embeds"][0])


def test_a_cache_made_otherwise_is_refused_with_what_differs(tmp_path, folder):
    path = write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 16})
    cache = build_cache(load_recipe(str(path)), tmp_path / "cache", shard_size=2, progress=False)

    # writing: another resolution into the same directory
    with pytest.raises(StaleCacheError, match=r"resolution: cache 16, now 32.*--overwrite$"):
        build_cache(load_recipe(str(path), ["data.resolution=32"]), cache, shard_size=2, progress=False)
    # training: another teacher, dtype or resolution, checked before any weight loads
    with pytest.raises(StaleCacheError, match="teacher pretrained: cache 'tiny:sd15', now 'tiny:sdxl'"):
        load_cached_teacher(from_cache(path, cache, "teacher.pretrained=tiny:sdxl"))
    with pytest.raises(StaleCacheError, match="teacher dtype: cache 'float32', now 'bfloat16'"):
        load_cached_teacher(from_cache(path, cache, "teacher.dtype=bfloat16"))
    with pytest.raises(StaleCacheError, match="resolution: cache 16, now 32"):
        load_cached_teacher(from_cache(path, cache, "data.resolution=32"))
    # the data: a caption edited after the cache was made
    meta = folder / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("pattern 2", "another pattern"))
    with pytest.raises(StaleCacheError, match=r"data changed in 1 shard\(s\), first items 2-2.*fewstep cache RECIPE"):
        load_cached_teacher(from_cache(path, cache))
    # --overwrite rebuilds it; a directory of other files is never written into
    build_cache(load_recipe(str(path)), cache, shard_size=2, overwrite=True, progress=False)
    load_cached_teacher(from_cache(path, cache))
    with pytest.raises(ValueError, match="not a fewstep cache"):
        build_cache(load_recipe(str(path)), folder, progress=False)
    assert sorted(os.listdir(folder)) == ["0.png", "1.png", "2.png", "metadata.jsonl"]


def test_recipes_training_from_a_cache_cannot_evaluate_periodically(tmp_path):
    data = yaml.safe_load(write_recipe(tmp_path, {"source": "cache", "path": str(tmp_path)}).read_text())
    data["eval"] = {"every_steps": 10}
    with pytest.raises(RecipeError, match="eval.every_steps"):
        validate_recipe(data)
    data["data"]["prompts"] = ["a cat"]
    with pytest.raises(RecipeError, match="not used with source: cache"):
        validate_recipe(data)
