"""Gradient checkpointing recomputes each block in the state of its forward. DMD2 with LoRA roles on one base
switches adapters between forwards and freezes the fake score around the generator's GAN forward; the checkpointed run
must end with exactly the weights of the run that keeps its activations."""

from __future__ import annotations

from fewstep.config import validate_recipe
from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from fewstep.train.loop import train


def dmd2_recipe(output_dir, checkpointing: bool):
    return validate_recipe({
        "teacher": {"pretrained": "fewstep:digits-vp", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4, "alpha": 4}, "gradient_checkpointing": checkpointing},
        "objective": {
            "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
            "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 0,
        },
        "data": {"source": "digits", "batch_size": 4},
        "optim": {"lr": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0},
        "train": {"max_steps": 3, "checkpoint_every": 3, "sample_every": None, "progress": False},
        "output_dir": str(output_dir),
    })  # fmt: skip


def test_checkpointed_dmd2_with_lora_roles_and_gan_equals_the_plain_run(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(dmd2_recipe(plain, checkpointing=False))
    train(dmd2_recipe(checkpointed, checkpointing=True))
    a, b = load_trainable_weights(checkpoint_dir(plain, 3)), load_trainable_weights(checkpoint_dir(checkpointed, 3))
    assert sorted(a) == sorted(b) == ["fake_score", "student"]
    for group in a:
        assert sorted(a[group]) == sorted(b[group])
        assert all(float((a[group][k] - b[group][k]).abs().max()) < 1e-6 for k in a[group]), group
    assert any(float(t.abs().max()) > 0 for k, t in a["fake_score"].items() if "lora_B" in k)  # the fake score trained
