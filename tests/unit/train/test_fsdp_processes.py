"""FSDP2 (``train.fsdp``) on two CPU processes over gloo: every role layout ends with the weights of the same run on
one process with the same global batch (two micro-batches of gradient accumulation), checkpoints are sharded and
resume on another world size, export consolidates them, and a failing rank stops the job with its error.

``train.seed_per_microbatch`` makes the noise of a micro-batch depend on its place in the global batch, so the two
layouts draw the same numbers; AdamW's ``eps`` is raised so that float-rounding differences in near-zero gradients
are not amplified to a full step (Adam's update is ``±lr`` whatever the gradient's size otherwise).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fewstep.train.checkpoint import checkpoint_dir, load_ema_weights, load_trainable_weights
from fewstep.train.run import load_run
from tests.helpers import captioned_noise_images, launch_two, launch_two_command, subprocess_env

ROOT = Path(__file__).resolve().parents[3]
TOLERANCE = 1e-5

LORA_DMD2 = {  # one frozen base carrying the student's and the fake score's adapters, the GAN head, 2-step student
    "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
    "student": {"kind": "lora", "lora": {"rank": 4, "alpha": 4}},
    "objective": {
        "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
        "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 0,
    },
}  # fmt: skip
FULL_DMD2 = {  # a full student, a full fake score and the frozen teacher: three sharded backbones
    "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
    "student": {"kind": "full"},
    "objective": {
        "name": "dmd2", "num_student_steps": 1, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
        "fake_score": "full", "gan_weight": 0.0, "health_reference_steps": 0,
    },
}  # fmt: skip
SCM = {  # forward-mode JVP through the sharded student, the adaptive weighting network kept whole
    "teacher": {"pretrained": "fewstep:digits-flow"},
    "student": {"kind": "full"},
    "objective": {"name": "scm", "tangent_warmup_steps": 2, "adaptive_weighting": True},
}


def recipe(path: Path, layout: dict[str, Any], steps: int, fsdp: dict[str, Any] | None, accumulate: int = 1) -> Path:
    """A recipe file for ``layout`` writing into ``path.with_suffix('')``: batch 4 per process, a checkpoint every 2
    steps, EMA, sharded with ``fsdp`` (None: not sharded)."""
    data = {
        **layout,
        "data": {"source": "digits", "batch_size": 4},
        "optim": {"lr": 1e-2, "eps": 1.0, "lr_scheduler": "constant", "warmup_steps": 0, "grad_clip": 1.0},
        "train": {
            "max_steps": steps, "checkpoint_every": 2, "keep_last": 10, "sample_every": None, "progress": False,
            "seed_per_microbatch": True, "gradient_accumulation_steps": accumulate, "ema_decay": 0.9,
            **({"fsdp": fsdp} if fsdp is not None else {}),
        },
        "output_dir": str(path.with_suffix("")),
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def train_one(recipe_path: Path, tmp_path: Path) -> None:
    """``fewstep train`` in one process (a subprocess: a sharded run sets up a process group of one)."""
    result = subprocess.run(
        [sys.executable, "-m", "fewstep", "train", str(recipe_path)],
        env={**subprocess_env(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def max_difference(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> float:
    assert sorted(a) == sorted(b) and all(sorted(a[g]) == sorted(b[g]) for g in a)
    return max(float((a[g][k].float() - b[g][k].float()).abs().max()) for g in a for k in a[g])


def flat_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("layout", "fsdp"),
    [
        (LORA_DMD2, {"enabled": True}),
        (LORA_DMD2, {"replicate": 2, "activation_checkpointing": True}),
        (FULL_DMD2, {"reshard_after_forward": False}),
        (SCM, {"enabled": True}),
    ],
    ids=["lora-roles-on-one-base", "hybrid-with-activation-checkpointing", "full-student-and-fake-score", "scm-jvp"],
)
def test_two_sharded_processes_equal_one_process(layout, fsdp, tmp_path):
    steps = 4
    sharded = launch_two(recipe(tmp_path / "two.yaml", layout, steps, fsdp), tmp_path)
    assert sharded["world_size"] == 2 and sharded["step"] == steps and sharded["nonfinite_steps"] == 0
    train_one(recipe(tmp_path / "one.yaml", layout, steps, None, accumulate=2), tmp_path)

    ckpt, reference = checkpoint_dir(tmp_path / "two", steps), checkpoint_dir(tmp_path / "one", steps)
    shards = sorted(p.name for p in (ckpt / "sharded").glob("*.safetensors"))
    assert len(shards) == 2 and not (ckpt / "trainable").exists() and not (ckpt / "ema.safetensors").exists()
    two, one = load_trainable_weights(ckpt), load_trainable_weights(reference)
    assert max_difference(two, one) < TOLERANCE
    assert flat_difference(load_ema_weights(ckpt), load_ema_weights(reference)) < TOLERANCE
    trained = max(float(t.abs().max()) for g in two.values() for t in g.values())
    assert trained > 0  # something trained (LoRA B starts at zero)


def test_sharded_checkpoints_resume_on_another_world_size_and_export_whole(tmp_path):
    steps = 4
    reference = tmp_path / "one.yaml"
    train_one(recipe(reference, LORA_DMD2, steps, None, accumulate=2), tmp_path)
    expected = load_trainable_weights(checkpoint_dir(tmp_path / "one", steps))

    # 2 -> 1: two processes to step 2, then one process (accumulating two micro-batches) to step 4
    launch_two(recipe(tmp_path / "two_one.yaml", LORA_DMD2, 2, {"enabled": True}), tmp_path)
    train_one(recipe(tmp_path / "two_one.yaml", LORA_DMD2, steps, {"enabled": True}, accumulate=2), tmp_path)
    two_one = tmp_path / "two_one"
    assert "step_00000002" in yaml.safe_load((two_one / "run_summary.json").read_text())["resumed_from"]
    assert max_difference(load_trainable_weights(checkpoint_dir(two_one, steps)), expected) < TOLERANCE

    # 1 -> 2: one sharded process to step 2, then two processes to step 4
    train_one(recipe(tmp_path / "one_two.yaml", LORA_DMD2, 2, {"enabled": True}, accumulate=2), tmp_path)
    summary = launch_two(recipe(tmp_path / "one_two.yaml", LORA_DMD2, steps, {"enabled": True}), tmp_path)
    assert summary["world_size"] == 2 and "step_00000002" in summary["resumed_from"]
    assert max_difference(load_trainable_weights(checkpoint_dir(tmp_path / "one_two", steps)), expected) < TOLERANCE

    # the one run loader (export, eval, sample) reads a sharded checkpoint whole, EMA included
    loaded = load_run(tmp_path / "one_two", weights="raw")
    groups = loaded.components.objective.trainable()
    student = {k: p.detach() for k, p in groups["student"].named_parameters() if p.requires_grad}
    assert flat_difference(student, expected["student"]) < TOLERANCE
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "fewstep", "export", str(tmp_path / "one_two"), "--out", str(export)],
        env={**subprocess_env(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (export / "model_index.json").is_file()


def test_a_failing_rank_stops_the_sharded_job_with_its_error(tmp_path):
    """Rank 1's first batch holds an image that cannot be decoded; rank 0's is fine and goes on to the first
    collective. The job must end, not hang, and show rank 1's error."""
    (tmp_path / "images").mkdir()
    images = captioned_noise_images(tmp_path / "images", count=4, size=32)
    (images / "3.png").write_bytes(b"not a png")  # unshuffled, batch 2 per rank: rank 1 reads 2.png and 3.png
    data = {
        "teacher": {"pretrained": "tiny:sd15"},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "diffusion"},
        "data": {"source": "image_folder", "path": str(images), "resolution": 32, "batch_size": 2, "shuffle": False},
        "train": {"max_steps": 2, "sample_every": None, "progress": False, "fsdp": {"enabled": True}},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**subprocess_env(tmp_path), "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf")}
    build = "from fewstep.testing import tiny_path; tiny_path('sd15')"  # once, not by both ranks at the same time
    subprocess.run([sys.executable, "-c", build], env={**env, "PYTHONPATH": str(ROOT)}, check=True, timeout=300)
    start = time.monotonic()
    result = subprocess.run(launch_two_command(path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - start < 240
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any("[process 1 of 2]" in line and "3.png" in line for line in errors), result.stderr[-3000:]


def test_a_sharded_checkpoint_from_before_a_groups_first_step_resumes(tmp_path):
    """DMD2 alternates its groups: after step 1 only one optimizer has state. The checkpoint holds none for the other,
    which resumes fresh, as it would have run on."""
    path = recipe(tmp_path / "run.yaml", LORA_DMD2, 1, {"enabled": True})
    train_one(path, tmp_path)
    train_one(recipe(tmp_path / "run.yaml", LORA_DMD2, 3, {"enabled": True}), tmp_path)
    summary = yaml.safe_load((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["step"] == 3 and "step_00000001" in summary["resumed_from"]
