"""Every shipped recipe trains 2 steps on its tiny model family and exports what its `export:` block asks for.

A recipe's family is its file name prefix (``sd15_…``, ``sdxl_…``, ``sd3_…``, ``flux_…``): its hub teacher is
swapped for ``tiny:<family>``. Recipes on the shipped digits teachers (``fewstep:…``) run as they are; one whose
teacher is another recipe's exported run (``…/<recipe>/export``) runs on that recipe's teacher. Only sizes change
(steps, batch, resolution, LoRA rank, TBCM's cache size and place): every other objective key stays as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from fewstep.config import load_recipe
from fewstep.config.load import LAUNCH_CONFIG_DIR
from fewstep.export.run import export_run
from fewstep.models.prompts import IMAGE_TO_VIDEO_FAMILIES
from fewstep.testing import FAMILIES
from fewstep.train.loop import train

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.relative_to(RECIPES_DIR).parts[0] != LAUNCH_CONFIG_DIR)


def recipe_id(path: Path) -> str:
    return path.relative_to(RECIPES_DIR).with_suffix("").as_posix()


def family_of(path: Path) -> str | None:
    # the longest family the name starts with: family names may hold "_" themselves (qwen_image_dmd2_lora)
    return next((f for f in sorted(FAMILIES, key=len, reverse=True) if path.stem.startswith(f + "_")), None)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Eight real digits (sklearn), upscaled to 32 px RGB, with captions in metadata.jsonl."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits_images")
    lines = []
    for i in range(8):
        gray = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(gray).resize((32, 32), Image.NEAREST).convert("RGB").save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {digits.target[i]}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """Two captioned 9-frame clips at 32 px (9 frames fit every tiny video VAE: Wan's 4k + 1 and LTX's 8k + 1)."""
    from fewstep.data.video import write_video

    root = tmp_path_factory.mktemp("clips")
    lines = []
    for i, caption in enumerate(["a red circle", "a blue square"]):
        frames = np.random.RandomState(i).randint(0, 256, (9, 32, 32, 3)).astype(np.uint8)
        write_video(frames, root / f"{i}.mp4")
        lines.append(json.dumps({"file_name": f"{i}.mp4", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_prompts(tmp_path: Path, suffix: str, family: str | None) -> Path:
    """Two prompts in the shipped recipe's format: a text file, or a ``.jsonl`` whose lines also name a first frame (a
    tiny image) when the family generates from one."""
    prompts = ["a red circle", "a blue square"]
    if suffix != ".jsonl":
        (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return tmp_path / "prompts.txt"
    rows = [{"prompt": p} for p in prompts]
    if family in IMAGE_TO_VIDEO_FAMILIES:
        for i, row in enumerate(rows):
            pixels = np.random.RandomState(i).randint(0, 256, (32, 32, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"frame{i}.png")
            row["image"] = f"frame{i}.png"
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path / "prompts.jsonl"


def smoke_overrides(path: Path, images: Path, tmp_path: Path, clips: Path | None = None) -> list[str]:
    shipped = load_recipe(path)
    overrides = [
        "train.max_steps=2", "train.checkpoint_every=1", "train.keep_last=1", "train.sample_every=2",
        "train.sample_steps=[1,2]", "train.num_sample_images=2", "train.mixed_precision=no", "train.progress=false",
        "train.log_every=1", "optim.warmup_steps=0", "data.batch_size=2", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    family = family_of(path)
    upstream = path.parent / f"{Path(shipped.teacher.pretrained).parent.name}.yaml"
    if family is not None:
        overrides.append(f"teacher.pretrained=tiny:{family}")
    elif Path(shipped.teacher.pretrained).name == "export" and upstream.is_file():
        # the exported run of another recipe (InstaFlow's 2-RF model): that recipe's teacher stands in for it
        overrides.append(f"teacher.pretrained={load_recipe(upstream).teacher.pretrained}")
    else:
        assert shipped.teacher.pretrained.startswith("fewstep:"), (
            f"{recipe_id(path)}: name it <family>_… (one of {FAMILIES}) so it can smoke-run on a tiny model"
        )
    if shipped.data.source == "image_folder" and shipped.data.num_frames is not None:  # a video folder
        overrides += [f"data.path={clips}", "data.resolution=32", "data.num_frames=9", "data.num_workers=0"]
    elif shipped.data.source == "image_folder":
        overrides += [f"data.path={images}", "data.resolution=32", "data.num_workers=0"]
    elif shipped.data.source == "fashion_mnist":  # a tiny idx directory: the test does not need Debian's package
        from fewstep.data.fashion import write_idx

        pixels = np.random.RandomState(0).randint(0, 256, (20, 28, 28)).astype(np.uint8)
        write_idx(tmp_path / "fashion" / "train-images-idx3-ubyte", pixels)
        write_idx(tmp_path / "fashion" / "train-labels-idx1-ubyte", (np.arange(20) % 10).astype(np.uint8))
        overrides.append(f"data.path={tmp_path / 'fashion'}")
    elif shipped.data.source == "pairs":  # reflow pairs are written by the test (write_smoke_pairs)
        overrides.append(f"data.path={tmp_path / 'pairs'}")
    elif shipped.data.source == "prompts" and shipped.data.path is not None:
        overrides.append(f"data.path={write_prompts(tmp_path, Path(shipped.data.path).suffix, family)}")
    if shipped.student.kind == "lora":
        overrides += ["student.lora.rank=4", "student.gradient_checkpointing=false"]
    if shipped.objective.name == "tbcm":  # the trajectory cache is rolled out before the first step: 2 shards
        overrides += ["objective.num_shards=2", f"objective.cache_dir={tmp_path / 'trajectories'}"]
    return overrides


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_recipe_trains_two_steps_and_exports(path: Path, image_folder: Path, tmp_path: Path, request):
    clips = request.getfixturevalue("video_folder") if load_recipe(path).data.num_frames is not None else None
    recipe = load_recipe(path, smoke_overrides(path, image_folder, tmp_path, clips))
    if recipe.data.source == "pairs":
        from fewstep.data.reflow.generate import pairs_for_recipe

        pairs_for_recipe(recipe, num_pairs=4, num_steps=2, prompts=["a red circle", "a blue square"], shard_size=2,
                         batch_size=2, progress=False)  # fmt: skip
    run = train(recipe)

    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["step"] == 2 and summary["nonfinite_steps"] == 0, summary
    assert (run / "resolved_config.yaml").is_file()
    assert (run / "samples" / "step_00000002.png").is_file(), "the sample grid at step 2 was not written"

    out = export_run(run, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "fewstep_student.json", "scheduler"} <= names, names
    if recipe.student.kind == "lora" and recipe.export.lora:
        with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all("lora" in k for k in keys), keys[:4]
    if recipe.student.kind == "full" or recipe.export.merged:
        lora_file = (out / "pytorch_lora_weights.safetensors").is_file()  # beside it, the merged pipeline is merged/
        root = out / "merged" if lora_file else out
        assert (root / "model_index.json").is_file() or any(root.glob("*.safetensors")), sorted(names)
    if recipe.objective.name == "phased_dmd":  # every expert, not only the main export's expert 0
        for k in range(recipe.objective.num_phases):
            expert = out / "experts" / f"expert{k}"
            assert (expert / "pytorch_lora_weights.safetensors").is_file() or (expert / "model_index.json").is_file()
