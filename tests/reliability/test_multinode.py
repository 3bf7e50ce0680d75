"""Two machines on localhost: ``accelerate launch --num_machines 2 --machine_rank 0/1`` with one CPU process each
(gloo) trains the same weights on both ranks, and the same weights as one machine with two processes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import GLOO_ABORT, digits_lora_recipe, free_port, launch_two, subprocess_env

STEPS = 3
TIMEOUT_S = 300
PEER_GRACE_S = 20  # a machine still running this long after the other failed is waiting for it


def machine_command(recipe: Path, machine_rank: int, port: int) -> list[str]:
    """What each machine runs: ``accelerate launch`` as one of two machines, one process on each."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "fewstep", "train", str(recipe),
    ]  # fmt: skip


def write_recipe(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(digits_lora_recipe(tmp_path / name, max_steps=STEPS, checkpoint_every=STEPS)))
    return path


def run_two_machines(recipe: Path, env: dict[str, str]) -> list[tuple[int, str]]:
    """Both machines' ``(exit code, output)``, launched at once on a fresh port. A machine whose worker finished waits
    in torchrun's exit barrier (300 s) for the other machine's agent, which never comes when that machine's worker
    died, so once one machine has failed the other is given a few seconds and then stopped: the test then sees the
    failure (and gloo's rare abort, which it retries) instead of a timeout that hides both outputs."""
    port = free_port()
    logs = [recipe.with_name(f"{recipe.stem}.machine{rank}.log") for rank in (0, 1)]
    machines = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            machines.append(
                subprocess.Popen(machine_command(recipe, rank, port), env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(machine.poll() is None for machine in machines) and time.monotonic() < deadline:
            if any(machine.poll() not in (None, 0) for machine in machines):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    for machine in machines:
                        machine.wait(timeout=PEER_GRACE_S)
                break
            time.sleep(0.5)
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    return [(machine.returncode, log.read_text()) for machine, log in zip(machines, logs)]


@pytest.mark.slow
def test_two_machines_train_the_weights_of_one_machine_with_two_processes(tmp_path):
    env = dict(subprocess_env(tmp_path), ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"))
    recipe = write_recipe(tmp_path, "two_machines")
    results = run_two_machines(recipe, env)
    if any(code != 0 and GLOO_ABORT in output for code, output in results):  # gloo's rare abort: once more
        shutil.rmtree(tmp_path / "two_machines", ignore_errors=True)
        results = run_two_machines(recipe, env)
    assert all(code == 0 for code, _ in results), "\n".join(
        f"machine {rank} (exit status {code}):\n{output[-3000:]}" for rank, (code, output) in enumerate(results)
    )
    summary = json.loads((tmp_path / "two_machines" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    prints = summary["weight_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1], "the machines' ranks diverged"

    one_machine = launch_two(write_recipe(tmp_path, "one_machine"), tmp_path)
    assert one_machine["world_size"] == 2 and one_machine["step"] == STEPS
    assert one_machine["weight_fingerprints"] == prints  # same ranks, same data shards, same all-reduce: same weights
