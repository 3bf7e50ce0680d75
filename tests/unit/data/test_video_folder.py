"""Video folders (``data.source: image_folder`` with ``data.num_frames``): clips sampled at the stride from known
frames, short and damaged files skipped and counted, frame counts and sizes the VAE cannot take refused before any
model work, DMD2 steps on tiny Wan from a folder and from prompts, and the video latent cache equal to a direct VAE
encode."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("av")

from fewstep.cli.main import main  # noqa: E402
from fewstep.config.errors import RecipeError  # noqa: E402
from fewstep.config.load import load_recipe  # noqa: E402
from fewstep.config.schema import TeacherConfig  # noqa: E402
from fewstep.data.cache import MANIFEST, StaleCacheError, load_cached_teacher  # noqa: E402
from fewstep.data.clips import decode_clip  # noqa: E402
from fewstep.data.image_folder import crop_to  # noqa: E402
from fewstep.data.loader import BatchStream  # noqa: E402
from fewstep.data.video import write_video  # noqa: E402
from fewstep.data.video_folder import VideoFolderDataset, prepare_video_data  # noqa: E402
from fewstep.models.loading import load_teacher
from fewstep.models.vae import encode_images  # noqa: E402
from fewstep.train.build import build_components  # noqa: E402
from fewstep.train.loop import train  # noqa: E402
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: E402, F401 (fixtures)

STEP = 20  # frame i of a test clip has the gray value i·STEP


def ramp(num_frames: int, height: int = 32, width: int = 32, offset: int = 0) -> np.ndarray:
    """``num_frames`` gray frames, frame i of value ``offset + i·STEP`` (uint8, ``[f, h, w, 3]``)."""
    values = (offset + STEP * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (num_frames, height, width, 3)).copy()


def video_folder(root: Path, clips: dict[str, np.ndarray | bytes]) -> Path:
    """A folder of ``clips`` (file name → frames, or raw bytes) with a metadata.jsonl captioning each."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, clip in clips.items():
        if isinstance(clip, bytes):
            (root / name).write_bytes(clip)
        else:
            write_video(clip, root / name)
        lines.append(json.dumps({"file_name": name, "text": f"clip {Path(name).stem}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def three_clips(root: Path) -> Path:
    return video_folder(root, {f"{i}.mp4": ramp(9, offset=30 * i) for i in range(3)})


def write_recipe(tmp_path: Path, data: dict, **train_cfg) -> Path:
    """A tiny-Wan DMD2 LoRA recipe over ``data`` (batch 2, in order), one step, no sample grids."""
    recipe = {
        "teacher": {"pretrained": "tiny:wan21", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2"},
        "data": {"batch_size": 2, "shuffle": False, **data},
        "train": {"max_steps": 1, "checkpoint_every": 1, "progress": False, **train_cfg},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_teacher(family: str):
    return load_teacher(TeacherConfig(pretrained=f"tiny:{family}", guidance_scale=2.0))


def trained_steps(run: Path) -> int:
    """The final step of a run, 0 if it had a non-finite step."""
    summary = json.loads((run / "run_summary.json").read_text())
    return summary["step"] if summary["nonfinite_steps"] == 0 else 0


@pytest.fixture(scope="module")
def wan():
    return tiny_teacher("wan21")


def test_clips_take_every_stride_th_frame_from_the_first_and_crop_like_images(tmp_path):
    frames = ramp(9, height=24, width=40)
    write_video(frames, tmp_path / "ramp.gif")  # GIF is exact for gray frames
    write_video(frames, tmp_path / "ramp.mp4")
    clip = decode_clip(tmp_path / "ramp.gif", 16, num_frames=4, frame_stride=2)
    assert clip.shape == (3, 4, 16, 16)
    expected = torch.stack([crop_to(Image.fromarray(frames[i]), 16) for i in (0, 2, 4, 6)], dim=1)
    torch.testing.assert_close(clip, expected, atol=0, rtol=0)
    assert ((clip[0, :, 0, 0] + 1) * 127.5).round().tolist() == [0, 40, 80, 120]
    near = decode_clip((tmp_path / "ramp.mp4").read_bytes(), 16, num_frames=4, frame_stride=2)  # bytes, as shards
    assert (near - clip).abs().max() * 127.5 <= 2  # H.264 at near-lossless quality


def test_short_and_corrupt_files_are_skipped_counted_and_summarised(tmp_path, caplog):
    folder = video_folder(tmp_path / "v", {
        "good0.mp4": ramp(9), "short.mp4": ramp(3), "good1.gif": ramp(9), "corrupt.mp4": b"not a video at all",
        "still.png": ramp(1)[0].tobytes(),
    })  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fewstep.data.video_folder"):
        data = VideoFolderDataset(folder, num_frames=5, frame_stride=2)
    assert [f.name for f, _ in data.items] == ["good0.mp4", "good1.gif"]
    assert {f.name: kind for f, kind, _ in data.skipped_files} == {
        "short.mp4": "too short", "corrupt.mp4": "unreadable", "still.png": "unreadable"}  # fmt: skip
    summary = data.summary()
    assert "skipped 3 file(s) of 5 (1 too short, 2 unreadable); first: short.mp4: its video has 3 frames; 5 at " \
           "stride 2 need 9" in summary  # fmt: skip
    assert summary in caplog.text and "skipped " + str(folder / "corrupt.mp4") in caplog.text

    only_bad = video_folder(tmp_path / "bad", {"short.mp4": ramp(3), "corrupt.webm": b"\x1a\x45garbage"})
    with pytest.raises(ValueError, match=r"No video in .* gives a clip of 5 frames at stride 2 \(9 frames of video\): "
                                         r".*skipped 2 file\(s\) of 2 .* Lower data.num_frames"):  # fmt: skip
        VideoFolderDataset(only_bad, num_frames=5, frame_stride=2)


def test_a_clip_that_breaks_mid_run_is_skipped_and_its_place_filled(tmp_path, wan, monkeypatch, caplog):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "latents"))
    folder = three_clips(tmp_path / "v")
    recipe = load_recipe(str(write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 32,
                                                     "num_frames": 5})))  # fmt: skip
    stream = BatchStream(recipe.data, wan)
    (folder / "1.mp4").write_bytes(b"damaged after the probe")
    with caplog.at_level(logging.WARNING):
        first = next(stream)  # items 0 and 1: 1 fails, 0 takes its place
        next(stream)  # item 2, then 0: the epoch ends
    assert first.x0.shape == (2, 16, 2, 4, 4)  # Wan: 5 frames → 2 latent frames, 32 px → 4 latents
    torch.testing.assert_close(first.x0[1], first.x0[0], atol=0, rtol=0)
    assert stream.skipped == 1
    assert "end of epoch 0: video folder" in caplog.text and "1.mp4: its video could not be decoded" in caplog.text


def test_frame_counts_and_sizes_the_vae_cannot_take_are_refused_with_the_nearest_valid_ones(tmp_path, wan):
    def data(**kw):
        recipe = {"source": "prompts", "prompts": ["a"], **kw}
        return load_recipe(str(write_recipe(tmp_path, recipe))).data

    with pytest.raises(
        ValueError,
        match=r"data.num_frames \(6 frames, 32×32\) do not fit the teacher: 6 frames do "
        r"not fit the wan21 VAE, .* rest 4× in time \(4k \+ 1 frames\): use 5 or 9\.",
    ):
        prepare_video_data(data(num_frames=6), wan)
    with pytest.raises(ValueError, match=r"resolution 40 is not a multiple of 16 .*: use 32 or 48\.$"):
        prepare_video_data(data(num_frames=5, resolution=40), wan)
    ltx = tiny_teacher("ltx")
    with pytest.raises(ValueError, match=r"compresses the rest 8× in time \(8k \+ 1 frames\): use 9 or 17"):
        prepare_video_data(data(num_frames=12), ltx)
    with pytest.raises(ValueError, match="the teacher 'sd15' is an image model: remove data.num_frames"):
        prepare_video_data(data(num_frames=5), tiny_teacher("sd15"))

    # the trainer refuses before it builds the student; the schema refuses sources without video
    recipe = load_recipe(str(write_recipe(tmp_path, {"source": "prompts", "prompts": ["a"], "num_frames": 7})))
    with pytest.raises(ValueError, match="use 5 or 9"):
        build_components(recipe, teacher=wan)
    with pytest.raises(RecipeError, match="num_frames.*not used with source: digits"):
        load_recipe(str(write_recipe(tmp_path, {"source": "digits", "num_frames": 5})))
    with pytest.raises(RecipeError, match="buckets.*not used with a video folder"):
        load_recipe(str(write_recipe(tmp_path, {"source": "image_folder", "path": "x", "buckets": [[32, 32]],
                                                "num_frames": 5})))  # fmt: skip


def test_dmd2_steps_on_tiny_wan_from_a_video_folder_and_from_prompts_with_num_frames(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "latents"))
    folder = three_clips(tmp_path / "v")
    path = write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 32, "num_frames": 5})
    assert trained_steps(train(load_recipe(str(path)))) == 1

    prompts = write_recipe(tmp_path, {"source": "prompts", "prompts": ["a cat", "a dog"], "num_frames": 9})
    recipe = load_recipe(str(prompts), [f"output_dir={tmp_path / 'prompts_run'}"])
    components = build_components(recipe)
    batch = next(BatchStream(recipe.data, components.teacher))
    shape, _ = components.objective.sample_shape(batch)
    assert shape == (2, 16, 3, 4, 4)  # 9 frames → 3 latent frames (the tiny pipeline's default is 5 → 2)
    out = components.objective.loss(batch, 0, components.objective.phase(0))
    assert torch.isfinite(out.loss)
    assert trained_steps(train(recipe)) == 1


def test_video_cache_round_trips_to_a_direct_vae_encode_and_trains(tmp_path, wan):
    folder = three_clips(tmp_path / "v")
    path = write_recipe(tmp_path, {"source": "image_folder", "path": str(folder), "resolution": 32, "num_frames": 5,
                                   "frame_stride": 2})  # fmt: skip
    cache = tmp_path / "cache"
    assert main(["cache", str(path), "--out", str(cache), "--shard-size", "2", "--no-progress"]) == 0
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["source"]["video"] == {"num_frames": 5, "frame_stride": 2}
    latents = torch.cat([load_file(cache / s["file"])["latents"] for s in manifest["shards"]])
    clips = torch.stack([decode_clip(folder / f"{i}.mp4", 32, 5, 2) for i in range(3)])
    with torch.no_grad():
        direct = encode_images(wan, clips)
    assert latents.shape == (3, 16, 2, 4, 4)
    torch.testing.assert_close(latents, direct, atol=1e-5, rtol=0)
    # a second run keeps the finished shards; another frame count is another cache
    written = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    (cache / "shard-00001.safetensors").unlink()  # as an interrupted run leaves it
    assert main(["cache", str(path), "--out", str(cache), "--shard-size", "2", "--no-progress"]) == 0
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == written["shard-00000.safetensors"]
    torch.testing.assert_close(load_file(cache / "shard-00001.safetensors")["latents"], latents[2:], atol=1e-6, rtol=0)
    assert main(["cache", str(path), "data.num_frames=9", "data.frame_stride=1", "--out", str(cache),
                 "--shard-size", "2", "--no-progress"]) == 2  # fmt: skip

    cached = load_recipe(str(path), ["data.source=cache", f"data.path={cache}"])  # the folder's clip settings
    with pytest.raises(StaleCacheError, match=r"source video: cache \{'num_frames': 5, 'frame_stride': 2\}"):
        load_cached_teacher(load_recipe(str(path), ["data.source=cache", f"data.path={cache}", "data.frame_stride=1"]))
    assert trained_steps(train(cached)) == 1
