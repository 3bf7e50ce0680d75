"""The README's "Using it" commands run as written, in order, in one fresh directory, offline.

Each line of the README's bash block runs verbatim through the shell, with the `fewstep` and `accelerate` console
scripts of this environment on PATH. The block names Stable Diffusion 1.5, which is neither on this machine nor
trainable here in test time, so three commands get words appended (never changed) that make them the same verb on
the recipe's tiny variant; `APPENDED` lists them and says why:

* `fewstep data ...`: the tiny SD1.5 teacher at 32 px; 4 images of 2 steps instead of the README's count
  (argparse keeps the last `--num-images`).
* `accelerate launch -m fewstep train ...`: the tiny teacher at 32 px, 2 steps of batch 2 with a rank-4 LoRA in fp32
  (the recipe's bf16 and gradient checkpointing only slow a CPU down), one labelled sample grid.
* The other commands load no model (`recipes`, `validate --no-files`, `train --dry-run`, `plan`: SDXL from the
  configs fewstep ships, on the meta device) or read back what the run wrote (`export`), so they run exactly as
  written.

A README edit that breaks a command, renames a path the recipe does not write, or adds a command that needs a model
without an entry here fails this test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = "teacher.pretrained=tiny:sd15 data.resolution=32"
APPENDED = {  # command prefix -> words appended to it
    "fewstep data ": f"{TINY} --num-images 4 --steps 2 --batch-size 4",
    "accelerate launch ": (
        f"{TINY} train.max_steps=2 data.batch_size=2 data.num_workers=0 student.lora.rank=4 "
        "student.gradient_checkpointing=false train.mixed_precision=no train.sample_every=2 "
        "train.sample_steps=[1,2] train.num_sample_images=2 train.checkpoint_every=2 train.progress=false"
    ),
}
NEEDS_NO_MODEL = ("fewstep recipes", "fewstep validate ", "fewstep plan ", "fewstep export ")


def readme_commands() -> list[str]:
    """The commands of the bash block under "## Using it", comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's 'Using it' section has no ```bash block"
    commands = []
    for line in block.group(1).splitlines():
        command = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if command:
            commands.append(command)
    return commands


def as_run(command: str) -> str:
    """The command as the test runs it: verbatim, plus the tiny-model words `APPENDED` gives its verb."""
    for prefix, words in APPENDED.items():
        if command.startswith(prefix):
            return f"{command} {words}"
    if command.startswith(NEEDS_NO_MODEL) or "--dry-run" in command.split():
        return command
    raise AssertionError(f"README command {command!r} has no tiny mapping: add one to APPENDED or NEEDS_NO_MODEL")


def test_readme_block_is_what_this_test_maps():
    verbs = [" ".join(c.split()[:2]) for c in readme_commands()]
    assert verbs == [
        "fewstep recipes", "fewstep validate", "fewstep data", "fewstep train", "fewstep plan", "accelerate launch",
        "fewstep export",
    ], verbs  # fmt: skip


@pytest.mark.skipif(not (BIN / "fewstep").is_file(), reason="the fewstep console script is not installed here")
def test_readme_using_it_commands_run_as_written(tmp_path: Path):
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1",
    )  # fmt: skip  # HF_HOME: no accelerate config of this machine's user; FEWSTEP_CACHE (tiny models) is inherited
    outputs = {}
    for command in readme_commands():
        result = subprocess.run(as_run(command), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, f"$ {as_run(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr
        outputs[" ".join(command.split()[:2])] = result.stdout

    assert "lcm/sd15_lcm_lora" in outputs["fewstep recipes"]
    assert outputs["fewstep validate"].startswith("valid: ")
    assert "max_steps: 2000" in outputs["fewstep train"]  # the --dry-run prints the resolved recipe
    assert "fsdp" in outputs["fewstep plan"].lower() and "accelerate launch" in outputs["fewstep plan"]

    images = tmp_path / "data" / "train_images"  # the recipe's data.path, written by `fewstep data`
    lines = (images / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all((images / json.loads(line)["file_name"]).is_file() for line in lines)

    run = tmp_path / "runs" / "lcm" / "sd15_lcm_lora"  # the recipe's output_dir, named by the README's export
    assert outputs["accelerate launch"].count("run directory: runs/lcm/sd15_lcm_lora") == 1
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (run / "samples" / "step_00000002.png").is_file()
    exported = tmp_path / "exported"
    assert (exported / "pytorch_lora_weights.safetensors").is_file()
    assert (exported / "scheduler" / "scheduler_config.json").is_file()


def test_every_readme_path_is_one_the_recipe_writes():
    """`fewstep export <dir>` names the recipe's output_dir, and `fewstep data` writes its data.path."""
    from fewstep.config import load_recipe

    for command in readme_commands():
        words = shlex.split(command)
        if words[:2] == ["fewstep", "export"]:
            run_dir = words[2].rstrip("/")
            recipes = [w for c in readme_commands() for w in shlex.split(c) if "/" in w and not w.startswith("-")]
            output_dirs = {load_recipe(r).output_dir for r in recipes if (ROOT / "recipes" / f"{r}.yaml").is_file()}
            assert run_dir in output_dirs, (run_dir, output_dirs)
