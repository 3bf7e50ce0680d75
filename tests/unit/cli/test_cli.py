"""The ``fewstep`` command line: exit codes, error output without tracebacks, dry-run YAML, recipe listing."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from fewstep.cli.main import main
from fewstep.config import Recipe, list_recipes, load_recipe

REPO = Path(__file__).resolve().parents[3]

VALID = """\
description: Digits LCM for the CLI tests
teacher: {pretrained: "fewstep:digits-vp", guidance_scale: 1.0}
objective: {name: lcm, w_min: 0.0, w_max: 0.0}
data: {source: digits, batch_size: 4}
train: {max_steps: 10, mixed_precision: no}
output_dir: runs/cli_test
"""

INVALID = """\
teacher: {pretrained: "fewstep:digits-vp", dtype: fp8}
objective: {name: lmc}
data: {source: digits, batch_sise: 4}
optim: {lr: -1.0}
output_dir: runs/cli_test
"""


def fewstep(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fewstep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "valid.yaml").write_text(VALID)
    (tmp_path / "invalid.yaml").write_text(INVALID)
    return tmp_path


def test_validate_exit_codes_and_every_error_without_traceback(recipes):
    ok = fewstep("validate", str(recipes / "quickstart" / "valid.yaml"), "train.max_steps=2")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("valid: ") and "objective lcm" in ok.stdout and "2 steps" in ok.stdout

    bad = fewstep("validate", str(recipes / "invalid.yaml"), "train.max_stesp=3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"error: 5 errors in recipe {recipes / 'invalid.yaml'}:")
    for line in [
        "  - teacher.dtype: not an allowed value; got 'fp8'; allowed: 'float32', 'bfloat16', 'float16'",
        "  - objective.name: unknown objective; got 'lmc'",
        "  - data.batch_sise: unknown key; got 4",
        "  - optim.lr: should be greater than 0; got -1.0",
        "  - train.max_stesp: unknown key; got 3",
    ]:
        assert line in bad.stderr
    assert "Did you mean 'lcm'?" in bad.stderr and "Did you mean 'batch_size'?" in bad.stderr


def test_dry_run_prints_the_resolved_recipe_that_loads_back(recipes, tmp_path):
    path = recipes / "quickstart" / "valid.yaml"
    overrides = ["train.max_steps=2", "train.sample_steps=[1,2]", "student.kind=full", "student.lora=null"]
    out = fewstep("train", str(path), overrides[0], "--dry-run", *overrides[1:])
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["max_steps"] == 2 and resolved["student"] == {
        "kind": "full",
        "lora": None,
        "gradient_checkpointing": False,
    }
    (tmp_path / "resolved.yaml").write_text(out.stdout)
    assert load_recipe(tmp_path / "resolved.yaml") == load_recipe(path, overrides)


def test_missing_recipe_is_a_user_error(tmp_path):
    out = fewstep("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: recipe {str(tmp_path / 'nope.yaml')!r} not found")


def test_recipes_lists_the_shipped_ones():
    out = fewstep("recipes")
    assert out.returncode == 0, out.stderr
    names = list_recipes()
    if names:
        listed = [line.split()[0] for line in out.stdout.splitlines()]
        assert listed == names
    else:
        assert out.stdout.startswith("no recipes found in")


def test_recipes_dir_lists_names_with_descriptions(recipes, capsys):
    assert main(["recipes", "--dir", str(recipes)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "invalid",
        "quickstart/valid  Digits LCM for the CLI tests",
    ]
    assert main(["recipes", "--dir", str(recipes / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_debug_shows_the_traceback(recipes, capsys):
    assert main(["--debug", "validate", str(recipes / "invalid.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "fewstep.config.errors.RecipeError" in err and "error: 4 errors" in err
    assert main(["validate", str(recipes / "invalid.yaml"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors(recipes, capsys):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["recipes", "train.max_steps=2"])
    assert info.value.code == 2 and "unrecognized arguments: train.max_steps=2" in capsys.readouterr().err
    assert main(["validate", str(recipes / "quickstart" / "valid.yaml"), "max_steps"]) == 2
    assert "should look like dotted.key=value" in capsys.readouterr().err


def test_train_and_export_call_their_entry_points(recipes, tmp_path, monkeypatch, capsys):
    # Only the wiring is under test here: the trainer and the exporter have their own tests.
    calls = []
    loop = types.ModuleType("fewstep.train.loop")
    loop.train = lambda recipe, evaluator: calls.append((recipe, evaluator)) or tmp_path / "run"
    loop.TrainingStopped = type("TrainingStopped", (RuntimeError,), {})
    monkeypatch.setattr(
        "fewstep.export.export_run", lambda run_dir, out, **kw: calls.append((run_dir, out, kw)) or out / "lora"
    )
    monkeypatch.setitem(sys.modules, "fewstep.train.loop", loop)

    assert main(["train", str(recipes / "quickstart" / "valid.yaml"), "--dry-run", "train.seed=3"]) == 0
    assert calls == [] and "seed: 3" in capsys.readouterr().out
    assert main(["train", str(recipes / "quickstart" / "valid.yaml"), "train.seed=3"]) == 0
    recipe, evaluator = calls[0]
    assert isinstance(recipe, Recipe) and recipe.train.seed == 3
    assert evaluator.__module__ == "fewstep.eval.periodic"  # `fewstep train` evaluates when eval.every_steps asks
    assert capsys.readouterr().out == f"run directory: {tmp_path / 'run'}\n"
    assert calls[0][0].train.overwrite is False
    assert main(["train", str(recipes / "quickstart" / "valid.yaml"), "--overwrite"]) == 0
    assert calls.pop()[0].train.overwrite is True  # --overwrite is train.overwrite=true
    capsys.readouterr()

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    from fewstep.eval.card import evaluation_section  # the card gets the run's eval table of the exported weights

    assert calls[1] == (tmp_path, tmp_path / "out", {"checkpoint": "latest", "weights": "auto",
                                                      "evaluation": evaluation_section, "hub_id": None})  # fmt: skip
    assert capsys.readouterr().out == f"exported to {tmp_path / 'out' / 'lora'}\n"
    assert (
        main(["export", str(tmp_path), "--out", str(tmp_path / "o2"), "--checkpoint", "best", "--weights", "raw"]) == 0
    )
    assert calls[2][2]["checkpoint"] == "best" and calls[2][2]["weights"] == "raw"
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "out")]) == 2
    assert "run directory" in capsys.readouterr().err


HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def _imported_after(code: str) -> list[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().splitlines()[-1].removeprefix("heavy:").split(",") if m]


def test_help_and_recipes_import_no_torch():
    help_ = "import contextlib, io\nimport fewstep.cli.main as m\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    help_ += "    try:\n        m.main(['--help'])\n    except SystemExit:\n        pass"
    assert _imported_after(help_) == []
    recipes = "import contextlib, io\nimport fewstep.cli.main as m\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    recipes += "    assert m.main(['recipes']) == 0\nassert 'pydantic' not in sys.modules"
    assert _imported_after(recipes) == []
    # parsing a verb's arguments needs none of them either (the work itself may)
    parse = "import fewstep.cli.main as m\nfor verb in ('validate', 'train'):\n"
    parse += "    m.parse_args(m.build_parser(load=[verb]), [verb, 'r.yaml', 'a=1'])"
    assert _imported_after(parse) == []


def test_verb_list_matches_the_verb_modules():
    def listed(parser):
        sub = next(a for a in parser._actions if a.dest == "verb")
        return [(choice.dest, choice.help) for choice in sub._choices_actions]

    from fewstep.cli.main import VERBS, build_parser, requested_verb

    assert listed(build_parser(load=[])) == listed(build_parser()), "VERBS help differs from a verb module's own"
    assert [name for name, _ in listed(build_parser())] == list(VERBS)
    assert requested_verb(["--debug", "validate", "train"]) == "validate"
    assert requested_verb(["--help"]) is None and requested_verb(["valdate"]) is None


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["valdate", "x.yaml"])
    assert info.value.code == 2 and "invalid choice: 'valdate'" in capsys.readouterr().err
