"""The trainer learns: the ``diffusion`` objective lowers a held-out loss on digits; sample grids and EMA work."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep.data.digits import DigitsDataset
from fewstep.models.conditioning import Conditioning
from fewstep.objectives.protocol import Batch
from fewstep.train.build import build_components
from fewstep.train.checkpoint import checkpoint_dir, load_trainable_weights
from fewstep.train.loop import Trainer, make_accelerator, train


def held_out_loss(objective, teacher) -> float:
    """The objective's loss on the digits test split with fixed τ, noise and dropout (seeded)."""
    test = DigitsDataset("test")
    torch.manual_seed(1234)
    losses = []
    with torch.no_grad():
        for start in range(0, 160, 40):
            cond = Conditioning(class_labels=test.labels[start : start + 40])
            batch = Batch(cond, teacher.uncond_like(cond), test.images[start : start + 40])
            losses.append(float(objective.loss(batch, 0, "student").loss))
    return sum(losses) / len(losses)


def test_diffusion_loss_decreases_on_digits(make_recipe, tmp_path):
    recipe = make_recipe(
        tmp_path / "run",
        data={"batch_size": 32},
        optim={"lr": 2e-3, "warmup_steps": 10},
        train={"max_steps": 100, "checkpoint_every": 100, "log_every": 10},
    )
    components = build_components(recipe)
    before = held_out_loss(components.objective, components.teacher)
    Trainer(recipe, make_accelerator(recipe), components).fit()
    after = held_out_loss(components.objective, components.teacher)
    assert after < 0.3 * before, (before, after)  # measured: 0.94 → 0.15


def test_lora_training_leaves_the_teacher_view_unchanged(make_recipe, tmp_path):
    recipe = make_recipe(tmp_path / "run", student={"kind": "lora", "lora": {"rank": 4}}, train={"max_steps": 5})
    components = build_components(recipe)
    teacher, student = components.teacher, components.student
    x, tau = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    cond = Conditioning(class_labels=torch.arange(4))
    teacher_before = teacher.predict(x, tau, cond).eps
    Trainer(recipe, make_accelerator(recipe), components).fit()
    assert torch.equal(teacher.predict(x, tau, cond).eps, teacher_before), "the frozen base moved"
    with torch.no_grad():
        assert not torch.allclose(student.denoiser(x, tau, cond).eps, teacher_before), "the adapters did not train"


def test_sample_grids_and_ema(make_recipe, tmp_path):
    recipe = make_recipe(
        tmp_path / "run",
        train={
            "max_steps": 4,
            "checkpoint_every": 4,
            "sample_every": 2,
            "sample_steps": [1, 2],
            "num_sample_images": 10,
            "ema_decay": 0.5,
        },
    )
    run = train(recipe)
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step_00000002.png", "step_00000004.png"]
    with Image.open(run / "samples" / "step_00000004.png") as img:
        # rows = step counts, columns = images; 8×8 digits are enlarged 8× to 64-pixel tiles, in a margin that
        # holds the row labels (left) and the class labels (top)
        left, top = img.width - 10 * 64, img.height - 2 * 64
        assert 0 < left < 64 and 0 < top < 32 and img.mode == "L"
        assert len(set(img.getdata())) > 2, "an empty grid"

    ckpt = checkpoint_dir(run, 4)
    ema = load_file(ckpt / "ema.safetensors")
    weights = load_trainable_weights(ckpt)["student"]
    assert set(ema) == {f"student/{k}" for k in weights}  # every trainable weight (this UNet has no buffers)
    name = next(k for k in weights if k.endswith("conv_in.weight"))
    assert not torch.equal(ema[f"student/{name}"], weights[name]), "EMA equals the live weights"


@pytest.mark.parametrize("field", ["grad_clip", "group_lr"])
def test_optimizer_settings(make_recipe, tmp_path, field):
    if field == "group_lr":
        with pytest.raises(ValueError, match="does not train"):
            train(make_recipe(tmp_path / "run", optim={"group_lr": {"fake_score": 1e-3}}))
    else:  # a tiny clip still trains, the logged grad norm is the unclipped one
        run = train(make_recipe(tmp_path / "run", optim={"grad_clip": 1e-6}, train={"max_steps": 2}))
        assert (checkpoint_dir(run, 2) / "COMPLETE").is_file()


def test_latent_teacher_with_an_image_folder(make_recipe, tmp_path, monkeypatch):
    """Tiny SD1.5 LoRA on captioned images: VAE latents, prompt encodings and a decoded RGB sample grid."""
    import json

    import numpy as np

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i in range(4):
            Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "text": f"noise {i}"}) + "\n")
    recipe = make_recipe(
        tmp_path / "run",
        teacher={"pretrained": "tiny:sd15", "guidance_scale": 2.0},
        student={"kind": "lora", "lora": {"rank": 4}},
        data={"source": "image_folder", "path": str(folder), "resolution": 16, "batch_size": 2},
        train={
            "max_steps": 2,
            "checkpoint_every": 2,
            "sample_every": 2,
            "sample_steps": [1, 2],
            "num_sample_images": 3,
        },
    )
    run = train(recipe)
    with Image.open(run / "samples" / "step_00000002.png") as img:
        # 16-pixel images enlarged 4×, in a margin with the step counts (left) and the captions (top)
        left, top = img.width - 3 * 64, img.height - 2 * 64
        assert img.mode == "RGB" and 0 < left < 64 and 0 < top < 32
    weights = load_trainable_weights(checkpoint_dir(run, 2))["student"]
    assert weights and all("lora_" in k for k in weights)
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4


def test_objective_that_does_not_fit_names_objective_and_teacher(make_recipe, tmp_path):
    recipe = make_recipe(
        tmp_path / "run",
        student={"kind": "lora", "lora": {"rank": 4}},
        objective={"name": "lcm", "guidance_embedding": True},
    )
    with pytest.raises(ValueError) as err:
        build_components(recipe)
    message = str(err.value)
    assert "Objective 'lcm' does not fit" in message and "'unet2d'" in message and "full student" in message
