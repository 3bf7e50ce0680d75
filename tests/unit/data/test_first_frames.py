"""First frames for image-to-video teachers from the training data: a prompts ``.jsonl`` naming an image per line and
the first frame of each clip of a video folder reach the conditioning DMD2 trains on exactly as a direct
``encode_prompts(..., images=)`` at the clip size the objective samples; data that cannot give them is refused at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fewstep.config.load import load_recipe
from fewstep.data.loader import BatchStream
from fewstep.data.prompts import PromptDataset
from fewstep.models.backbones import video_defaults
from fewstep.models.prompts import encode_prompts
from fewstep.train.build import build_components
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

SIDE = {"wan21_i2v": 32, "wan22_ti2v": 64}  # the tiny pipelines' default clip sides
FIELD = {"wan21_i2v": "condition_latents", "wan22_ti2v": "first_frame_latents"}


def random_image(seed: int, side: int = 32) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (side, side, 3)).astype(np.uint8))


def write_recipe(tmp_path: Path, family: str, data: dict) -> Path:
    recipe = {
        "teacher": {"pretrained": f"tiny:{family}", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2", "health_reference_steps": 0},
        "data": {"batch_size": 3, "shuffle": False, **data},
        "train": {"max_steps": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_jsonl(root: Path, rows: list[tuple[str, int | None]]) -> Path:
    """``rows`` of (prompt, image seed or None) as a prompts .jsonl with the images beside it."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt, seed in rows:
        row = {"prompt": prompt}
        if seed is not None:
            random_image(seed).save(root / f"frame{seed}.png")
            row["image"] = f"frame{seed}.png"
        lines.append(json.dumps(row))
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root / "prompts.jsonl"


@pytest.mark.parametrize("family", ["wan21_i2v", "wan22_ti2v"])
def test_dmd2_step_from_a_prompts_jsonl_with_first_frames(tmp_path, family):
    # one prompt with two images: the prompt cache keys on (prompt, image)
    jsonl = write_jsonl(tmp_path / "p", [("a cat", 0), ("a cat", 1), ("a dog", 0)])
    recipe = load_recipe(str(write_recipe(tmp_path, family, {"source": "prompts", "path": str(jsonl)})))
    components = build_components(recipe)
    teacher, objective = components.teacher, components.objective
    batch = next(BatchStream(recipe.data, teacher))

    frames, height, width = video_defaults(teacher.pipeline)
    assert (frames, height, width) == (5, SIDE[family], SIDE[family])
    images = [random_image(s) for s in (0, 1, 0)]
    cond, uncond = encode_prompts(teacher, ["a cat", "a cat", "a dog"], images=images, resolution=(height, width),
                                  num_frames=frames)  # fmt: skip
    field = FIELD[family]
    got = getattr(batch.cond, field)
    torch.testing.assert_close(got, getattr(cond, field), atol=0, rtol=0)
    torch.testing.assert_close(getattr(batch.uncond, field), got, atol=0, rtol=0)  # the null branch keeps the image
    torch.testing.assert_close(batch.cond.prompt_embeds, cond.prompt_embeds, atol=0, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-3  # same prompt, other image
    torch.testing.assert_close(got[0], got[2], atol=0, rtol=0)  # other prompt, same image
    if family == "wan21_i2v":
        torch.testing.assert_close(batch.cond.image_embeds, cond.image_embeds, atol=0, rtol=0)

    shape, _ = objective.sample_shape(batch)  # what DMD2 draws its noise at: the clip the first frames were made for
    assert shape[2:] == got.shape[2:] if family == "wan21_i2v" else shape[-2:] == got.shape[-2:]
    out = objective.loss(batch, 0, objective.phase(0))
    assert torch.isfinite(out.loss)


def clip_frames(seed: int, num_frames: int, side: int) -> np.ndarray:
    """A clip whose frames differ (a random first frame, then shifted copies)."""
    first = np.random.RandomState(seed).randint(0, 256, (side, side, 3)).astype(np.uint8)
    return np.stack([np.roll(first, 3 * i, axis=1) for i in range(num_frames)])


@pytest.mark.parametrize("family", ["wan21_i2v", "wan22_ti2v"])
def test_dmd2_step_from_a_video_folder_on_each_clips_first_frame(tmp_path, monkeypatch, family):
    pytest.importorskip("av")
    from fewstep.data.clips import decode_clip
    from fewstep.data.video import write_video

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    side, stride = SIDE[family], 2
    folder = tmp_path / "v"
    lines = []
    for i in range(3):
        write_video(clip_frames(i, 9, side), folder / f"{i}.mp4")
        lines.append(json.dumps({"file_name": f"{i}.mp4", "text": f"clip {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = {"source": "image_folder", "path": str(folder), "resolution": side, "num_frames": 5, "frame_stride": stride}
    recipe = load_recipe(str(write_recipe(tmp_path, family, data)))
    components = build_components(recipe)
    teacher, objective = components.teacher, components.objective
    batch = next(BatchStream(recipe.data, teacher))

    pixels = torch.stack([decode_clip(folder / f"{i}.mp4", side, 5, stride)[:, 0] for i in range(3)])  # [3, 3, H, W]
    cond, _ = encode_prompts(teacher, [f"clip {i}" for i in range(3)], images=pixels, resolution=(side, side),
                             num_frames=5)  # fmt: skip
    field = FIELD[family]
    torch.testing.assert_close(getattr(batch.cond, field), getattr(cond, field), atol=0, rtol=0)
    torch.testing.assert_close(getattr(batch.uncond, field), getattr(cond, field), atol=0, rtol=0)
    if family == "wan22_ti2v":  # TI2V's first latent frame is the clip's own first latent frame (a causal VAE)
        torch.testing.assert_close(cond.first_frame_latents, batch.x0[:, :, :1], atol=1e-4, rtol=0)
    out = objective.loss(batch, 0, objective.phase(0))
    assert torch.isfinite(out.loss)
    again = next(BatchStream(recipe.data, teacher))  # latents and first frames now come from the disk cache
    torch.testing.assert_close(getattr(again.cond, field), getattr(batch.cond, field), atol=0, rtol=0)


def test_data_without_first_frames_is_refused_with_the_format(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\n")
    recipe = load_recipe(str(write_recipe(tmp_path, "wan21_i2v", {"source": "prompts", "path": str(txt)})))
    teacher = build_components(recipe).teacher
    with pytest.raises(ValueError, match=r'prompts name no image: give data.path as a .jsonl .*"image"'):
        BatchStream(recipe.data, teacher)

    folder = tmp_path / "images"
    folder.mkdir()
    random_image(0).save(folder / "0.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cat"}) + "\n")
    images = {"source": "image_folder", "path": str(folder), "resolution": 32}
    with pytest.raises(ValueError, match="An image folder gives single images"):
        BatchStream(load_recipe(str(write_recipe(tmp_path, "wan21_i2v", images))).data, teacher)

    from fewstep.data.cache_writer import build_cache

    jsonl = write_jsonl(tmp_path / "p", [("a cat", 0)])
    cached = load_recipe(str(write_recipe(tmp_path, "wan21_i2v", {"source": "prompts", "path": str(jsonl)})))
    with pytest.raises(ValueError, match="A cache holds .* no first frames"):
        build_cache(cached, tmp_path / "c", progress=False)


def test_prompt_files_name_first_frames_per_line(tmp_path):
    jsonl = write_jsonl(tmp_path, [("a cat", 0), ("a dog", 1)])
    dataset = PromptDataset(path=jsonl)
    assert dataset.prompts == ["a cat", "a dog"]
    assert dataset.images == [tmp_path / "frame0.png", tmp_path / "frame1.png"]
    assert PromptDataset(prompts=["a cat"]).images is None
    with pytest.raises(ValueError, match='1 of 2 lines name an "image"'):
        PromptDataset(path=write_jsonl(tmp_path / "mixed", [("a cat", 0), ("a dog", None)]))
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "a cat", "image": "nope.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl:1 names the image 'nope.png'"):
        PromptDataset(path=tmp_path / "missing.jsonl")


def test_video_shards_condition_on_each_clips_first_frame(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("webdataset")
    import io
    import tarfile
    from types import SimpleNamespace

    from fewstep.config.schema import DataConfig
    from fewstep.data.loader import build_batches
    from fewstep.data.video import write_video
    from fewstep.data.webdataset import decode_sample
    from fewstep.models.loading import load_teacher

    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21_i2v"))
    samples = []
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for i in range(2):
            clip = write_video(clip_frames(i, 5, 32), tmp_path / f"{i}.mp4").read_bytes()
            samples.append({"__key__": str(i), "mp4": clip, "txt": f"clip {i}".encode()})
            for ext, payload in (("mp4", clip), ("txt", f"clip {i}".encode())):
                info = tarfile.TarInfo(f"{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "v.tar"), resolution=32, num_frames=5, batch_size=2,
                     shuffle=False)  # fmt: skip
    batch = next(build_batches(cfg, teacher))
    pixels = torch.stack([decode_sample(s, 32, num_frames=5)[0][:, 0] for s in samples])
    cond, _ = encode_prompts(teacher, ["clip 0", "clip 1"], images=pixels, resolution=(32, 32), num_frames=5)
    torch.testing.assert_close(batch.cond.condition_latents, cond.condition_latents, atol=0, rtol=0)
    torch.testing.assert_close(batch.uncond.image_embeds, cond.image_embeds, atol=0, rtol=0)
    image_shards = DataConfig(source="webdataset", path=str(tmp_path / "v.tar"), resolution=32, batch_size=2)
    with pytest.raises(ValueError, match="Image shards give single images"):
        build_batches(image_shards, teacher)
