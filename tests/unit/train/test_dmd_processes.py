"""DMD2 with a shared-base LoRA student and LoRA fake score (two adapters on one module, one optimizer each) under
``accelerate launch`` with two CPU processes (gloo DDP): both ranks end with identical weights."""

from __future__ import annotations

from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from tests.helpers import launch_two


def test_two_processes_train_identical_dmd2_adapters(make_recipe, write_recipe, tmp_path):
    run = tmp_path / "run"
    steps = 6  # TTUR 2: generator at steps 0 and 3, fake score (with the GAN head) at the others
    objective = {
        "name": "dmd2", "num_student_steps": 2, "real_guidance_scale": 2.0, "fake_steps_per_generator_step": 2,
        "fake_score": "lora", "gan_weight": 1.0e-2, "health_reference_steps": 2,
    }  # fmt: skip
    recipe = write_recipe(
        make_recipe(
            run,
            objective=objective,
            student={"kind": "lora", "lora": {"rank": 4, "alpha": 4}},
            data={"batch_size": 4},
            train={"max_steps": steps, "checkpoint_every": steps},
        ),
        tmp_path / "recipe.yaml",
    )
    summary = launch_two(recipe, tmp_path)
    assert summary["world_size"] == 2 and summary["step"] == steps and summary["nonfinite_steps"] == 0
    prints = summary["weight_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1], "the ranks diverged"

    weights = load_trainable_weights(checkpoint_dir(run, steps))
    assert set(weights) == {"student", "fake_score"}
    student, fake = weights["student"], weights["fake_score"]
    assert all(".default." in k.replace("__", ".") for k in student), list(student)[:3]
    assert any(k.startswith("head.") for k in fake) and all(
        ".fake." in k.replace("__", ".") for k in fake if k.startswith("core.")
    )
    trained_b = [t for k, t in student.items() if "lora_B" in k] + [t for k, t in fake.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in trained_b), "both adapters start at B = 0; something must have trained"
