"""docs/python_api.md runs as written: its Python blocks, in order, next to a run of the shipped
``lcm/sd15_lcm_lora`` recipe trained for 2 steps on ``tiny:sd15``."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from fewstep.config import load_recipe
from fewstep.train import train
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

DOC = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"
RUN_DIR = "runs/lcm/sd15_lcm_lora"  # the recipe's output_dir, relative to the working directory


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_loader_module() -> types.ModuleType | None:
    """``None`` where ``fewstep.train.run`` exists; else a stand-in with its ``load_run`` signature over the older
    ``fewstep.export.run.load_run`` (newest checkpoint, raw weights), so the doc runs before and after that move."""
    if importlib.util.find_spec("fewstep.train.run") is not None:
        return None
    from fewstep.export.run import load_run as load_newest

    def load_run(run_dir, checkpoint="latest", weights="auto", teacher=None):
        assert checkpoint == "latest" and weights in ("auto", "raw"), (checkpoint, weights)
        recipe, components = load_newest(run_dir, teacher=teacher)
        return SimpleNamespace(run_dir=Path(run_dir), recipe=recipe, components=components, weights="raw")

    module = types.ModuleType("fewstep.train.run")
    module.load_run = load_run
    return module


def write_images(folder: Path, count: int = 4) -> Path:
    """``count`` 16×16 RGB images with captions (``metadata.jsonl``), the data of an ``image_folder`` recipe."""
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_python_api_doc_runs_on_a_tiny_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_images(tmp_path / "images")
    overrides = [
        "teacher.pretrained=tiny:sd15", "student.lora.rank=4", "student.gradient_checkpointing=false",
        "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=null", "train.mixed_precision=no",
        "train.progress=false", "optim.warmup_steps=0", "data.batch_size=2", f"data.path={folder}",
        "data.resolution=16", "data.num_workers=0",
    ]  # fmt: skip
    recipe = load_recipe("lcm/sd15_lcm_lora", overrides)
    assert recipe.output_dir == RUN_DIR, "the doc loads the shipped recipe's output_dir"
    train(recipe)
    shim = run_loader_module()
    if shim is not None:
        monkeypatch.setitem(sys.modules, "fewstep.train.run", shim)

    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 3, "sampling, saving, a module without parameters"
    scope: dict = {"__name__": "python_api_doc"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), scope)  # the doc's own asserts run too

    images = scope["images"]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert scope["shape"] == (2, 4, 8, 8)  # tiny:sd15: 16 px through its VAE (2× downsampling)
    saved = np.asarray(Image.open(tmp_path / "sample_1.png"))
    assert saved.shape == (16, 16, 3)
    assert np.abs(saved / 255.0 - images[1].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6

    # the same seed gives the same images: the noise, then the re-noising, come from the one CPU generator
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(scope["shape"], generator=generator)
    with torch.no_grad():
        again = scope["sample"](noise, scope["cond"], 4, generator)
    assert torch.equal(again, scope["latents"])
    assert scope["toy"].denoiser.dtype == torch.float32  # a module without parameters
