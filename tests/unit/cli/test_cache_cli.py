"""``fewstep cache``: a shipped recipe's image folder cached with the tiny teacher, trained from with the printed
command, resumed, refused when stale (one error line, exit 2), and written by two ``accelerate launch`` ranks into
disjoint shards that equal one process's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewstep.cli.main import main
from fewstep.config.load import load_recipe
from fewstep.data.cache_writer import build_cache
from tests.helpers import (  # noqa: F401 (fixtures)
    captioned_noise_images,
    fresh_accelerate_state,
    launch_two_command,
    one_error,
    single_thread,
    subprocess_env,
)

RECIPE = "lcm/sd15_lcm_lora"
TINY = ["teacher.pretrained=tiny:sd15", "data.path=images", "data.resolution=16", "data.num_workers=0"]
TRAIN = [
    "train.max_steps=1", "data.batch_size=2", "student.lora.rank=4", "student.gradient_checkpointing=false",
    "train.mixed_precision=no", "train.progress=false", "train.sample_every=1", "train.sample_steps=[1]",
    "train.num_sample_images=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every command runs in the test's own directory: the recipe's relative data.path and output_dir land there."""
    monkeypatch.chdir(tmp_path)


def images(tmp_path: Path, count: int) -> Path:
    (tmp_path / "images").mkdir()
    return captioned_noise_images(tmp_path / "images", count=count, size=16)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cache_then_train_from_it_resume_and_stale(tmp_path, capsys):
    images(tmp_path, 3)
    code, out, _ = cli(capsys, "cache", RECIPE, *TINY, "--shard-size", "2", "--no-progress")
    assert code == 0 and "cache: images/.fewstep_cache (3 items in 2 shards" in out
    train_line = out.splitlines()[-1]
    assert train_line.endswith("data.source=cache data.path=images/.fewstep_cache")
    manifest = json.loads((tmp_path / "images" / ".fewstep_cache" / "manifest.json").read_text())
    assert manifest["command"].startswith(f"fewstep cache {RECIPE} teacher.pretrained=tiny:sd15")
    assert manifest["resolution"] == 16 and manifest["teacher"]["encoders"].keys() == {"text_encoder", "vae"}

    # the printed command trains (one step, a sample grid decoded with the VAE loaded for it)
    train_words = train_line.removeprefix("train from it: fewstep ").split()
    assert cli(capsys, *train_words, *TRAIN)[0] == 0
    run = tmp_path / "runs" / "lcm" / "sd15_lcm_lora"
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert (run / "samples" / "step_00000001.png").is_file()

    # a second run keeps the shards; another resolution is refused in one line that names the fix
    shard = tmp_path / "images" / ".fewstep_cache" / "shard-00000.safetensors"
    before = shard.stat().st_mtime_ns
    assert cli(capsys, "cache", RECIPE, *TINY, "--shard-size", "2", "--no-progress")[0] == 0
    assert shard.stat().st_mtime_ns == before
    code, _, err = cli(capsys, "cache", RECIPE, *TINY, "data.resolution=32", "--shard-size", "2")
    assert code == 2
    one_error(err, "is stale: resolution: cache 16, now 32", "data.resolution=32 --out images/.fewstep_cache",
              "--overwrite")  # fmt: skip
    # training with another teacher: refused before it loads
    code, _, err = cli(capsys, *train_words, *TRAIN, "teacher.pretrained=tiny:sdxl", "train.resume=never",
                       "output_dir=other")  # fmt: skip
    assert code == 2
    one_error(err, "teacher pretrained: cache 'tiny:sd15', now 'tiny:sdxl'", "fewstep cache RECIPE --overwrite")
    # a recipe whose data cannot be cached says so; a missing cache is reported before anything loads
    code, _, err = cli(capsys, "cache", "quickstart/digits_lcm")
    assert code == 2
    one_error(err, "data.source: digits has nothing to cache")
    code, _, err = cli(capsys, "validate", RECIPE, *TINY, "data.source=cache", "data.path=nowhere")
    assert code == 2 and "data.path: does not exist" in err and "fewstep cache RECIPE --out DIR" in err
    code, _, err = cli(capsys, "data", RECIPE, *TINY, "data.source=cache", "data.path=nowhere")
    assert code == 2
    one_error(err, "data.source: cache is written by `fewstep cache`")


def test_two_processes_write_disjoint_shards_equal_to_one_process(tmp_path):
    images(tmp_path, 4)
    single = build_cache(load_recipe(RECIPE, TINY), tmp_path / "single", shard_size=1, progress=False)
    command = launch_two_command(Path(RECIPE))[:-2]  # ... -m fewstep
    assert command[-2:] == ["-m", "fewstep"]
    command += ["cache", RECIPE, *TINY, "--out", "two", "--shard-size", "1", "--no-progress"]
    env = dict(subprocess_env(tmp_path), ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("cache: two (4 items in 4 shards") == 1  # printed once, by the main process

    writers = {}
    for k in range(4):
        name = f"shard-{k:05d}.safetensors"
        with safe_open(str(tmp_path / "two" / name), framework="pt") as f:
            writers[k] = f.metadata()["rank"]
        ours, theirs = load_file(tmp_path / "two" / name), load_file(single / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert writers == {0: "0", 1: "1", 2: "0", 3: "1"}


def test_plan_of_a_cache_recipe_counts_no_encoders(capsys):
    """`fewstep plan` builds the recipe on the meta device as training would load it: without the text encoders
    and the VAE when it trains from a cache (SDXL's 1.68 GiB in bf16)."""

    def plan(*overrides: str) -> dict:
        assert main(["plan", "dmd/sdxl_dmd2_lora", "--gpus", "1", "--json", *overrides]) == 0
        return json.loads(capsys.readouterr().out)["layouts"][0]

    folder = plan()
    cache = plan("data.source=cache", "data.path=cache", "data.prompts=null")
    assert folder["persistent"]["encoders, VAE, buffers"] > 1.6 * 2**30
    assert cache["persistent"]["encoders, VAE, buffers"] == 0
    saved = folder["persistent"]["encoders, VAE, buffers"]
    assert folder["peak_bytes"] - cache["peak_bytes"] == saved
