"""``fewstep`` on bad input and on runs that fail: one ``error:`` line naming the cause and the fix, exit status 2 for
bad input and 1 for a run that failed, never a traceback; YAML whose aliases or nesting would blow up is refused in
well under a second; recipes that cannot train are refused by ``fewstep validate``."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fewstep.cli.main import main
from tests.helpers import TINY_LCM_RECIPE, fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]

RECIPE = TINY_LCM_RECIPE
HANG_S = 30.0  # a guard against a blow-up (minutes), not a speed target: the measured time is ~0.1 s

# 10 levels of 9-fold aliases: 9**9 strings (about 387 million) under an unknown key, in under 500 bytes.
BOMB = (
    "teacher: {pretrained: 'fewstep:digits-vp'}\nobjective: {name: lcm}\ndata: {source: digits}\noutput_dir: x\n"
    "lol:\n  a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
    + "".join(f"  {c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
)


def recipe(tmp_path: Path, text: str = RECIPE, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("OUT", str(tmp_path / "run")))
    return path


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``fewstep ARGV`` in this process: (exit status, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def recipe_error(err: str, *needles: str) -> None:
    """A recipe error: ``error: N error(s) in recipe ...`` with one line per problem, no traceback."""
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and " in recipe " in err.splitlines()[0], err
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------------------------------------------------- YAML


def test_alias_bomb_under_an_unknown_key_is_refused_in_well_under_a_second(tmp_path, capsys):
    """A ~500-byte document whose aliases stand for hundreds of millions of strings, under an unknown key, took 139 s
    and 7.7 GB: the error message built the value's whole repr before cutting it to 80 characters."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert path.stat().st_size < 500
    start = time.perf_counter()
    code, err = cli(capsys, "validate", str(path))
    assert time.perf_counter() - start < HANG_S  # an exponential blow-up would take minutes
    assert code == 2
    one_error(err, f"{path}:", "more than 100,000 values once its anchors and aliases", "Remove the repeated aliases")


def test_aliases_below_the_limit_are_reported_with_short_values(tmp_path, capsys):
    """Under the limit (9**4 strings behind each alias) the unknown keys are still named, each value cut to one short
    repr that is built only as far as it is shown."""
    import fewstep.config.schema  # noqa: F401 (the schema's first import is not what is timed)

    lines = BOMB.splitlines()[:9]  # up to `d`: 6561 strings behind *d
    text = "\n".join(lines) + "\n  x: *d\n  y: *d\nmore: [*d, *d, *d]\n"
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, err = cli(capsys, "validate", str(path))
    assert time.perf_counter() - start < HANG_S  # an exponential blow-up would take minutes
    assert code == 2 and "Traceback" not in err
    assert "  - lol: unknown key; got {'a': ['lol', 'lol'," in err and "  - more: unknown key; got [[[[['lol'," in err
    assert max(len(line) for line in err.splitlines()) < 300


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_refused_without_a_traceback_or_a_hang(tmp_path, capsys, where):
    """20,000 nested brackets raised RecursionError inside the YAML parser and printed a traceback."""
    deep = "[" * 20_000 + "]" * 20_000
    if where == "file":
        path = recipe(tmp_path, RECIPE + f"extra: {deep}\n")
        argv = ["validate", str(path)]
    else:
        argv = ["validate", str(recipe(tmp_path)), f"train.sample_steps={deep}"]
    start = time.perf_counter()
    code, err = cli(capsys, *argv)
    assert time.perf_counter() - start < HANG_S  # an exponential blow-up would take minutes
    assert code == 2
    one_error(err, "nested deeper than 64 levels of blocks and lists")


def test_a_binary_recipe_file_is_one_clear_error(tmp_path, capsys):
    """A recipe file that is not UTF-8 raised UnicodeDecodeError with a codec message."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"teacher: \xff\xfe\x00binary")
    code, err = cli(capsys, "validate", str(path))
    assert code == 2
    one_error(err, str(path), "is not UTF-8 text")


# ----------------------------------------------------------------------------------------- recipes refused early


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["teacher.pretrained=tiny:sd16"], ["teacher.pretrained: unknown tiny model family", "tiny:sd15"]),
        (["teacher.pretrained=fewstep:digit-vp"], ["teacher.pretrained: unknown fewstep asset", "fewstep:digits-vp"]),
        (["teacher.pretrained=/nonexistent/teacher"], ["teacher.pretrained: does not exist"]),
        (["data.source=tensors", "data.path=/nonexistent.safetensors"], ["data.path: does not exist"]),
        (["data.source=pairs", "data.path=/nonexistent"], ["data.path: does not exist"]),
        (["data.source=prompts", "data.path=/nonexistent.txt"], ["data.path: does not exist"]),
        (["train.sample_every=1", "train.sample_steps=[1,100]"], ["train.sample_steps[1]: is more steps than"]),
        (["eval.every_steps=1", "eval.steps=[60]"], ["eval.steps[0]: is more steps than", "at most 50"]),
        (["train.resume=latest"], ["train.resume: is neither auto, never nor an existing checkpoint directory"]),
        (["objective={name: pcm, reward_weight: 1.0}"], ["objective.reward: required when objective.reward_weight"]),
        (["objective={name: pcm, reward: 'custom:../evil:fn'}"], ["must read custom:<module>:<function>"]),
    ],
)
def test_validate_refuses_what_training_would_reject_later(tmp_path, capsys, overrides, needles):
    """These recipes were accepted by `fewstep validate` and failed (or silently turned sampling or evaluation off)
    only once training had started."""
    code, err = cli(capsys, "validate", str(recipe(tmp_path)), *overrides)
    assert code == 2 and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_validate_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, err = cli(capsys, "validate", str(recipe(tmp_path)), f"output_dir={tmp_path / 'afile'}")
    assert code == 2 and "output_dir: is a file" in err


def test_validate_no_files_checks_a_recipe_meant_for_another_machine(tmp_path, capsys):
    argv = ["validate", str(recipe(tmp_path)), "data.source=pairs", "data.path=/elsewhere/pairs"]
    assert cli(capsys, *argv)[0] == 2
    assert cli(capsys, *argv, "--no-files")[0] == 0


# ------------------------------------------------------------------------------------------- one line, no traceback


def test_output_dir_pointing_at_a_file_is_one_error_line(tmp_path, capsys):
    """`fewstep train` with output_dir naming an existing file printed a FileExistsError traceback."""
    (tmp_path / "afile").write_text("keep me")
    code, err = cli(capsys, "train", str(recipe(tmp_path)), f"output_dir={tmp_path / 'afile'}")
    assert code == 2
    recipe_error(err, "output_dir", str(tmp_path / "afile"))  # refused before anything loads
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_missing_resume_path_is_one_error_line(tmp_path, capsys):
    """A CheckpointError (a RuntimeError) escaped the command line as a traceback."""
    code, err = cli(capsys, "train", str(recipe(tmp_path)), f"train.resume={tmp_path / 'gone'}")
    assert code == 2
    recipe_error(err, "train.resume", str(tmp_path / "gone"))  # refused before anything loads


@pytest.fixture
def trained(tmp_path) -> Path:
    """A one-step digits run with its checkpoint."""
    path = recipe(tmp_path)
    assert main(["train", str(path)]) == 0
    return path


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("truncate_weights", "student.safetensors"),
        ("garbage_state", "state.json"),
        ("empty_trainable", "trainable"),
    ],
)
def test_a_corrupt_checkpoint_on_resume_is_one_error_line(trained, tmp_path, capsys, damage, needle):
    """Corrupt checkpoints printed tracebacks on resume (KeyError, JSONDecodeError, safetensors errors)."""
    capsys.readouterr()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    weights = ckpt / "trainable" / "student.safetensors"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage_state":
        (ckpt / "state.json").write_text('{"step": [1, {')
    else:
        weights.unlink()
    code, err = cli(capsys, "train", str(trained), "train.max_steps=2")
    assert code == 2
    one_error(err, needle)


def test_export_of_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    code, err = cli(capsys, "export", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2
    one_error(err, "resolved_config.yaml", "not a fewstep run directory")


def test_a_pair_manifest_missing_a_key_is_one_error_line(tmp_path, capsys):
    """A pairs.json without `settings` raised a bare KeyError traceback when training started."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "pairs.json").write_text(json.dumps({"complete": True, "shards": []}))
    code, err = cli(capsys, "train", str(recipe(tmp_path)), "data.source=pairs", f"data.path={pairs}")
    assert code == 2
    one_error(err, "KeyError: 'settings'", "corrupt or foreign file")


def test_the_non_finite_stop_is_a_failed_run_with_exit_1(tmp_path, capsys):
    """The trainer's stop after too many non-finite steps printed a RuntimeError traceback."""
    data = tmp_path / "nan.safetensors"
    save_file({"x0": torch.full((4, 1, 8, 8), float("nan")), "class_labels": torch.zeros(4, dtype=torch.long)}, data)
    argv = ["train", str(recipe(tmp_path)), "data.source=tensors", f"data.path={data}", "train.max_steps=3"]
    code, err = cli(capsys, *argv, "train.max_nonfinite=0")
    assert code == 1
    one_error(err, "non-finite", "Stopping")


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_during_training_is_a_failed_run_with_exit_1(tmp_path):
    """A checkpoint write that ran out of room (here `ulimit -f`: the 2.8 MB student does not fit in 200 kB) printed
    a safetensors traceback with exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "fewstep", "train", str(recipe(tmp_path))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    one_error(out.stderr, "file too large", "ulimit -f", "os error 27")


def test_debug_still_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, err = cli(capsys, "--debug", "train", str(recipe(tmp_path)), f"output_dir={tmp_path / 'afile'}")
    assert code == 2 and "Traceback" in err and "RecipeError" in err


def test_a_bug_keeps_its_traceback(capsys):
    """Only user and run errors are turned into one line: anything else is a bug and must stay visible."""
    from fewstep.cli.main import exit_status

    assert exit_status(ZeroDivisionError("x")) is None
    assert exit_status(AttributeError("x")) is None
