"""``fewstep sample``: a run and its export give the same images, a text teacher writes its files, sheet and records
reproducibly, user mistakes are one ``error:`` line, and video samples are written as MP4 / WebP / GIF."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from fewstep.cli.main import main
from fewstep.config import validate_recipe
from fewstep.data.video import check_video_format, default_video_format, write_video
from fewstep.eval.harness import Sampler
from fewstep.eval.sample import sample_target
from fewstep.eval.targets import Target
from fewstep.train.loop import train
from fewstep.train.manifest import sha256_file
from tests.helpers import digits_lora_recipe, fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A rank-4 LoRA of fewstep:digits-vp (diffusion objective, teacher w = 2), 2 steps, checkpoints at 1 and 2, EMA."""
    run = tmp_path_factory.mktemp("digits") / "run"
    recipe = digits_lora_recipe(run, {"lr": 1e-2}, max_steps=2, checkpoint_every=1, ema_decay=0.5)
    recipe["teacher"]["guidance_scale"] = 2.0
    train(validate_recipe(recipe))
    return run


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_a_run_and_its_export_sample_the_same_images(digits_run, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", str(digits_run), "--out", str(export)]) == 0  # the EMA weights, a merged DDPMPipeline
    given = ["--labels", "0,1,2", "--seeds", "0,1", *CPU]  # default steps: the diffusion student's recommended 25
    assert main(["sample", str(digits_run), "--out", str(tmp_path / "run"), *given]) == 0
    assert main(["sample", str(export), "--out", str(tmp_path / "export_samples"), *given]) == 0
    ours, theirs = records(tmp_path / "run"), records(tmp_path / "export_samples")
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert (a["file"], a["label"], a["seed"], a["steps"], a["guidance_scale"]) == (
            b["file"], b["label"], b["seed"], b["steps"], b["guidance_scale"])  # fmt: skip
        assert a["steps"] == 25 and a["guidance_scale"] == 2.0
        x, y = pixels(tmp_path / "run" / a["file"]), pixels(tmp_path / "export_samples" / b["file"])
        # measured: float images within 1.2e-6, identical 8-bit PNGs; allow one rounding flip per pixel
        assert np.abs(x - y).max() <= 1 and (x == y).mean() >= 0.99 and x.std() > 20
    assert {r["file"] for r in ours} == {f"000{i}_label{i}_seed{s}_25steps.png" for i in range(3) for s in (0, 1)}

    ckpt = digits_run / "checkpoints" / "step_00000002"
    model = ours[0]["model"]
    assert model["kind"] == "run" and model["checkpoint_step"] == 2 and model["weights"] == "ema"
    assert model["objective"] == "diffusion" and model["teacher"] == "fewstep:digits-vp"
    assert model["weights_sha256"] == {"ema.safetensors": sha256_file(ckpt / "ema.safetensors")}
    exported = theirs[0]["model"]
    assert (exported["kind"], exported["objective"], exported["source"]["weights"]) == ("export", "diffusion", "ema")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert exported["weights_sha256"] == {weights: sha256_file(export / weights)}
    sheet = Image.open(tmp_path / "run" / "contact_sheet.png")
    assert sheet.width > 2 * 64 and sheet.height > 3 * 64  # 3 rows x 2 seeds of 64 px tiles, plus the labels
    assert "contact sheet:" in capsys.readouterr().out

    older = tmp_path / "step1"
    assert main(["sample", str(digits_run), "--checkpoint", "step_1", "--weights", "raw", "--steps", "2",
                 "--labels", "4", "--out", str(older), *CPU]) == 0  # fmt: skip
    (record,) = records(older)
    assert (record["file"], record["model"]["checkpoint_step"]) == ("0000_label4_seed0_2steps.png", 1)
    assert list(record["model"]["weights_sha256"]) == ["trainable/student.safetensors"]


def test_a_text_teacher_writes_pngs_sheet_and_records_reproducibly(tmp_path):
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square", "--seeds", "0,1", *CPU]
    assert main(["sample", "tiny:sd15", "--out", str(tmp_path / "a"), *prompts]) == 0
    pngs = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert pngs == ["0000_a_red_circle_seed0_50steps.png", "0000_a_red_circle_seed1_50steps.png",
                    "0001_a_blue_square_seed0_50steps.png", "0001_a_blue_square_seed1_50steps.png"]  # fmt: skip
    assert (tmp_path / "a" / "contact_sheet.png").is_file()
    lines = records(tmp_path / "a")
    assert sorted((r["prompt"], r["seed"]) for r in lines) == [
        ("a blue square", 0), ("a blue square", 1), ("a red circle", 0), ("a red circle", 1)]  # fmt: skip
    for r in lines:
        assert r["steps"] == 50 and r["guidance_scale"] == 7.5  # the teacher's defaults: 50 steps, SD's w = 7.5
        assert r["model"]["kind"] == "teacher" and r["model"]["spec"] == "tiny:sd15"
        assert (tmp_path / "a" / r["file"]).is_file()
    assert pixels(tmp_path / "a" / pngs[0]).shape == (16, 16, 3)
    assert not np.array_equal(pixels(tmp_path / "a" / pngs[0]), pixels(tmp_path / "a" / pngs[1]))  # seeds differ

    assert main(["sample", "tiny:sd15", "--out", str(tmp_path / "b"), *prompts]) == 0
    for name in pngs:  # the same seeds again: the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    alone = tmp_path / "alone"
    assert main(["sample", "tiny:sd15", "--prompt", "a blue square", "--seeds", "1", "--out", str(alone), *CPU]) == 0
    # a seed's noise does not depend on the batch: alone, the image is the one sampled among four
    x, y = pixels(alone / "0000_a_blue_square_seed1_50steps.png"), pixels(tmp_path / "a" / pngs[3])
    assert np.abs(x - y).max() <= 1 and (x == y).mean() >= 0.99


def test_prompts_and_seeds_from_a_jsonl_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 7}\n\n{"prompt": "a green line"}\n')
    out = tmp_path / "out"
    assert main(["sample", "tiny:sd15", "--prompts", str(prompts), "--num-seeds", "2", "--steps", "1,2",
                 "--guidance", "1", "--out", str(out), *CPU]) == 0  # fmt: skip
    got = sorted((r["prompt"], r["seed"], r["steps"], r["guidance_scale"]) for r in records(out))
    assert got == [("a green line", 0, 1, 1.0), ("a green line", 0, 2, 1.0), ("a green line", 1, 1, 1.0),
                   ("a green line", 1, 2, 1.0), ("a red circle", 7, 1, 1.0), ("a red circle", 7, 2, 1.0)]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/run"], "Sampling target '/no/such/run' does not exist"),
        (["tiny:sd15", "--prompts", "/no/prompts.txt"], "Prompt file '/no/prompts.txt' does not exist"),
        (["fewstep:digits-vp", "--prompt", "a cat"], "is class-conditional (labels 0..9), not text-conditioned"),
        (["tiny:sd15", "--labels", "0,1"], "is text-conditioned: pass --prompt"),
        (["tiny:sd15"], "is text-conditioned: give prompts"),
        (["fewstep:digits-vp", "--labels", "3,12"], "Labels [12] are outside the 10 classes"),
        (["fewstep:digits-vp", "--steps", "0"], "steps must be integers >= 1"),
        (["fewstep:digits-vp", "--seeds", "a,b"], "--seeds expects comma-separated integers"),
        (["fewstep:digits-vp", "--batch-size", "0"], "batch_size must be >= 1"),
    ],
)
def test_user_mistakes_exit_2_with_one_error_line(args, message, tmp_path, capsys):
    assert main(["sample", *args, "--out", str(tmp_path / "out"), *CPU]) == 2
    one_error(capsys.readouterr().err, message)


def test_bad_prompt_files_and_checkpoints_name_the_problem(digits_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["sample", "tiny:sd15", "--prompts", str(empty), *CPU]) == 2
    one_error(capsys.readouterr().err, f"Prompt file {str(empty)!r} is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    assert main(["sample", "tiny:sd15", "--prompts", str(bad), *CPU]) == 2
    one_error(capsys.readouterr().err, f"{bad}:2: expected an object with")
    assert main(["sample", str(digits_run), "--checkpoint", "step_9", "--out", str(tmp_path / "o"), *CPU]) == 2
    one_error(capsys.readouterr().err, "has no complete checkpoint of step 9; its checkpoints are at steps [1, 2]")
    assert main(["sample", str(digits_run), "--checkpoint", "best", "--out", str(tmp_path / "o"), *CPU]) == 2
    one_error(capsys.readouterr().err, "not a complete checkpoint")


# ---------------------------------------------------------------------------------------------------------- video


def moving_square(num_frames: int = 12, height: int = 32, width: int = 48, size: int = 8) -> np.ndarray:
    """``(frames, H, W, 3)`` uint8: an orange square moving right by 3 px per frame on black."""
    clip = np.zeros((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        clip[f, 12 : 12 + size, 2 + 3 * f : 2 + 3 * f + size] = (255, 160, 40)
    return clip


def centre_x(frame: np.ndarray) -> float:
    """The horizontal centre of the bright pixels."""
    xs = np.nonzero(frame.astype(int).sum(-1) > 200)[1]
    return float(xs.mean())


def test_mp4_decodes_to_the_same_frames_roughly(tmp_path):
    av = pytest.importorskip("av")  # the `video` extra
    clip = moving_square()
    path = write_video(clip, tmp_path / "clip.mp4", fps=6)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 6
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert frames.shape == clip.shape  # 12 frames, 32 x 48
    assert np.abs(frames.astype(int) - clip).mean() < 2  # measured 0.49 (chroma subsampling at the square's edges)
    for decoded, original in zip(frames, clip):
        assert abs(centre_x(decoded) - centre_x(original)) < 0.5
    odd = write_video(clip[:, :31, :47, :1], tmp_path / "odd.mp4")  # grayscale, odd sides: padded to even
    with av.open(str(odd)) as container:
        assert container.streams.video[0].codec_context.height == 32


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_webp_and_gif_hold_every_frame_exactly(suffix, tmp_path):
    clip = moving_square()
    path = write_video(clip, tmp_path / f"clip.{suffix}", fps=4)
    with Image.open(path) as image:
        frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)])
    assert np.array_equal(frames, clip)


def test_bad_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(frames, H, W, C\) uint8"):
        write_video(np.zeros((4, 8, 8, 3), np.float32), tmp_path / "x.gif")
    with pytest.raises(ValueError, match="Unknown video format '.avi'"):
        write_video(moving_square(), tmp_path / "x.avi")


def test_video_samples_become_videos_and_first_frames_on_the_sheet(tmp_path):
    """A sampler that returns 5-D ``[b, c, f, h, w]`` clips (the square starts where the sample's noise says)."""

    def clips(noise, inputs, num_steps, generator):
        starts = (noise[:, 0, 0, 0, 0] > 0).long() * 10  # per seed
        video = torch.zeros(len(noise), 3, 6, 16, 32)
        for b, start in enumerate(starts.tolist()):
            for f in range(6):
                video[b, :, f, 4:12, start + 2 * f : start + 2 * f + 8] = 1.0
        return video

    target = Target("custom", "moving squares", [Sampler("clips", clips, (3, 6, 16, 32), [1])], "none",
                    recommended_steps=1)  # fmt: skip
    result = sample_target(target, tmp_path / "gif", seeds=[0, 1, 2], video_format="gif", progress=False)
    assert [r["file"] for r in result.records] == [f"0000_seed{s}_1steps.gif" for s in (0, 1, 2)]
    for record in result.records:
        with Image.open(tmp_path / "gif" / record["file"]) as image:
            assert image.n_frames == 6 and image.size == (32, 16)
    width, height = Image.open(result.contact_sheet).size  # one row, three seeds of 32 x 64 px first frames
    assert width > 3 * 64 and 32 < height < 2 * 32 + 30
    av = pytest.importorskip("av")
    mp4 = sample_target(target, tmp_path / "mp4", seeds=[0], progress=False)  # default with PyAV: mp4
    with av.open(str(tmp_path / "mp4" / mp4.records[0]["file"])) as container:
        assert len(list(container.decode(video=0))) == 6


def test_without_pyav_videos_default_to_webp_and_mp4_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails, as without the `video` extra
    assert default_video_format() == "webp"
    with pytest.raises(ValueError, match=r"pip install 'fewstep\[video\]'"):
        check_video_format("mp4")
    assert main(["sample", "fewstep:digits-vp", "--video-format", "mp4", "--out", str(tmp_path), *CPU]) == 2
    one_error(capsys.readouterr().err, "Writing MP4 needs PyAV")
