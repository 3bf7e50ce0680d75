"""Image folders → VAE latents (with the on-disk cache) and prompt sets → the teacher's own prompt encodings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.config.schema import DataConfig
from fewstep.data.image_folder import ImageFolderDataset, LatentCache, load_image
from fewstep.data.loader import BatchStream
from fewstep.data.prompts import PromptDataset
from fewstep.models.loading import load_teacher
from fewstep.models.prompts import encode_prompts
from fewstep.models.vae import encode_images


@pytest.fixture(scope="module")
def sd15():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend with the other test worker
    cfg = SimpleNamespace(pretrained="tiny:sd15", family="auto", dtype="float32", guidance_scale=1.0)
    yield load_teacher(SimpleNamespace(**vars(cfg), revision=None, variant=None))
    torch.set_num_threads(before)


def make_folder(root, sizes=((20, 16), (16, 16), (24, 30))):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_load_image_resizes_and_center_crops(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 8)  # 32×16 → 16×8 → center 8×8: columns 4..11 of the resized image
    assert x.shape == (3, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x[:, :, :3].max()) < -0.9 and float(x[:, :, 5:].min()) > 0.9


def test_image_folder_latents_and_cache(sd15, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "images")
    cfg = DataConfig(source="image_folder", path=str(folder), resolution=16, batch_size=3, shuffle=False,
                     caption_column="caption")  # fmt: skip
    batch = next(BatchStream(cfg, sd15))
    expected = encode_images(sd15, torch.stack([load_image(folder / f"{i}.png", 16) for i in range(3)]))
    assert batch.x0.shape == (3, 4, 8, 8) and torch.allclose(batch.x0, expected, atol=1e-5)
    cond, uncond = encode_prompts(sd15, ["picture 0", "picture 1", "picture 2"])
    assert torch.allclose(batch.cond.prompt_embeds, cond.prompt_embeds, atol=1e-6)
    assert torch.allclose(batch.uncond.prompt_embeds, uncond.prompt_embeds, atol=1e-6)
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 3

    # A second stream reads the cached latents: breaking the VAE does not change them.
    with torch.no_grad():
        for p in sd15.pipeline.vae.parameters():
            p.mul_(0.5)
    try:
        again = next(BatchStream(cfg, sd15))
    finally:
        with torch.no_grad():
            for p in sd15.pipeline.vae.parameters():
                p.mul_(2.0)
    assert torch.equal(again.x0, batch.x0)


def test_cache_key_changes_with_file_and_resolution(tmp_path):
    folder = make_folder(tmp_path / "images")
    cache = LatentCache("vae-a", root=tmp_path / "c")
    a = cache.path(folder / "0.png", 16)
    assert a != cache.path(folder / "0.png", 32) and a != cache.path(folder / "1.png", 16)
    assert a != LatentCache("vae-b", root=tmp_path / "c").path(folder / "0.png", 16)
    cache.put(folder / "0.png", 16, torch.arange(4.0))
    assert torch.equal(cache.get(folder / "0.png", 16), torch.arange(4.0))
    Image.new("RGB", (5, 5)).save(folder / "0.png")  # the file changed: the old latent is not reused
    assert cache.get(folder / "0.png", 16) is None


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderDataset(tmp_path)
    folder = make_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="caption_column"):
        ImageFolderDataset(folder, caption_column="text")


def test_prompt_source_encodes_each_prompt_once(sd15, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a red cube\n\n  a blue ball  \n")
    assert PromptDataset(path=file).prompts == ["a red cube", "a blue ball"]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        PromptDataset(path=tmp_path / "missing.txt")

    cfg = DataConfig(source="prompts", path=str(file), batch_size=3, shuffle=False)
    s = BatchStream(cfg, sd15)
    batch = next(s)  # positions 0, 1, 2 → prompts 0, 1, 0
    assert batch.x0 is None and batch.cond.prompt_embeds.shape[0] == 3
    assert len(s._prompts._rows) == 2
    cond, _ = encode_prompts(sd15, ["a red cube", "a blue ball", "a red cube"])
    assert torch.allclose(batch.cond.prompt_embeds, cond.prompt_embeds, atol=1e-6)
