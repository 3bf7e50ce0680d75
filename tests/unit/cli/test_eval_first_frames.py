"""``fewstep eval`` of an image-to-video run: the first frames come from ``--images`` (an image for every prompt, a
folder with one per prompt, a prompts .jsonl naming one per line) and reach the student and the teacher alike; the
clips are measured frame by frame and written as videos; without first frames the run is refused before it loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fewstep.cli.main import main
from fewstep.config.load import load_recipe
from fewstep.train.loop import train
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)

PROMPTS = ["a red circle rolling", "a blue square falling"]


def random_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny Wan 2.1 I2V DMD2 LoRA run, one step, trained on a prompts .jsonl with a first frame per line."""
    root = tmp_path_factory.mktemp("i2v")
    lines = []
    for i, prompt in enumerate(PROMPTS):
        random_image(root / "data" / f"frame{i}.png", 10 + i)
        lines.append(json.dumps({"prompt": prompt, "image": f"frame{i}.png"}))
    (root / "data" / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {
        "teacher": {"pretrained": "tiny:wan21_i2v", "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2", "num_student_steps": 2, "health_reference_steps": 0},
        "data": {"source": "prompts", "path": str(root / "data" / "prompts.jsonl"), "batch_size": 2},
        "train": {"max_steps": 1, "progress": False, "sample_every": None},
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(str(root / "recipe.yaml")))
    return root / "run"


def evaluate(run: Path, out: Path, *extra: str) -> dict:
    argv = ["eval", str(run), "--steps", "1", "--num-samples", "2", "--batch-size", "2", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "eval.json").read_text())


def grid(out: Path) -> np.ndarray:
    return np.asarray(Image.open(out / "grid.png").convert("RGB")).astype(np.int16)


def test_a_run_is_evaluated_on_the_first_frame_of_every_prompt(run, tmp_path, capsys):
    frame = random_image(tmp_path / "first.png", 0)
    out = tmp_path / "eval"
    report = evaluate(run, out, "--teacher-steps", "2", "--images", str(frame))
    rows = {(r["model"], r["num_steps"]): r for r in report["rows"]}
    assert set(rows) == {("student (dmd2, raw)", 1), ("teacher (Euler, w=2) · reference", 2)}
    student = rows[("student (dmd2, raw)", 1)]
    assert student["num_images"] == 2 and student["nfe_per_image"] == 1
    for name in ("fid_teacher", "diversity", "diversity_ratio"):
        assert np.isfinite(student["metrics"][name]), name
    # the clips (5 frames each) are measured frame by frame, and written one video each
    assert report["metrics"]["fid_teacher"]["num_generated_images"] == 2 * 5
    clips = sorted(p.name for p in (out / student["images_dir"]).iterdir())
    assert len(clips) == 2 and clips[0].startswith("00000.")
    assert (out / "grid.png").is_file() and (out / student["grid"]).is_file()
    # student and reference teacher were given the same first frames, and the report says which
    digests = {m["first_frames_sha256"] for m in report["models"].values()}
    assert len(digests) == 1 and report["teacher_reference"]["key"]["first_frames_sha256"] in digests
    assert "| student (dmd2, raw) | 1 | 1 |" in capsys.readouterr().out


def test_other_first_frames_give_other_clips(run, tmp_path):
    """The first frame reaches the sampler: the same image gives the same clips, another image other clips, and a
    prompts .jsonl or a folder gives each prompt its own."""
    one, other = random_image(tmp_path / "a.png", 1), random_image(tmp_path / "b.png", 2)
    cheap = ["--no-teacher", "--metrics", "diversity"]
    for name, image in (("a", one), ("a2", one), ("b", other)):
        evaluate(run, tmp_path / name, *cheap, "--images", str(image))
    first, again, changed = grid(tmp_path / "a"), grid(tmp_path / "a2"), grid(tmp_path / "b")
    assert np.array_equal(first, again)
    assert np.abs(first - changed).max() > 10

    # per prompt: the first prompt from `one`, the second from `other`; a folder in file-name order is the same
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "image": f}) for p, f in zip(PROMPTS, ["a.png", "b.png"])))
    per_prompt = evaluate(run, tmp_path / "j", *cheap, "--images", str(jsonl))
    assert per_prompt["inputs"]["prompts"] == PROMPTS
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    from_folder = evaluate(run, tmp_path / "f", *cheap, "--images", str(folder), "--prompts", str(prompts_file))
    assert np.array_equal(grid(tmp_path / "j"), grid(tmp_path / "f"))
    digest = next(iter(per_prompt["models"].values()))["first_frames_sha256"]
    assert digest == next(iter(from_folder["models"].values()))["first_frames_sha256"]
    assert not np.array_equal(grid(tmp_path / "j"), first)  # the second clip starts from `other`
    # a --prompts .jsonl that names images is its own source of first frames
    from_prompts = evaluate(run, tmp_path / "p", *cheap, "--prompts", str(jsonl))
    assert next(iter(from_prompts["models"].values()))["first_frames_sha256"] == digest


def test_an_i2v_run_without_first_frames_is_refused_before_it_loads(run, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the run was loaded")

    monkeypatch.setattr("fewstep.eval.targets.load_run", no_loading)
    assert main(["eval", str(run), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a wan21_i2v model, which generates each clip from its first frame: pass --images" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny:sd15", "--images", "IMAGE"], "--images gives first frames to image-to-video models"),
        (["RUN", "--images", "/no/such.png"], "--images '/no/such.png' does not exist"),
        (["RUN", "--images", "FOLDER"], "is a folder, one first frame per prompt in file-name order: give the prompts"),
        (
            ["RUN", "--images", "FOLDER", "--prompts", "PROMPTS"],
            "holds 1 image(s) (.png, .jpg, .jpeg, .webp, .bmp) for 2",
        ),
        (["RUN", "--images", "JSONL", "--prompts", "PROMPTS"], "is a prompts .jsonl, which names the prompts itself"),
        (["RUN", "--images", "PROMPTS"], "is not an image"),
        (["RUN", "--images", "TWICE"], "names two first frames for the prompt 'a cat'"),
    ],
)
def test_first_frame_mistakes_exit_2_with_one_error_line(run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("fewstep.eval.targets.load_run", lambda *a, **k: pytest.fail("the run was loaded"))
    image = random_image(tmp_path / "folder" / "0.png", 0)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "image": "folder/0.png"}) + "\n")
    twice = [{"prompt": "a cat", "image": "folder/0.png"}, {"prompt": "a cat", "image": "b.png"}]
    random_image(tmp_path / "b.png", 1)
    (tmp_path / "twice.jsonl").write_text("\n".join(json.dumps(row) for row in twice) + "\n")
    names = {"RUN": str(run), "IMAGE": str(image), "FOLDER": str(image.parent), "JSONL": str(tmp_path / "p.jsonl"),
             "PROMPTS": str(tmp_path / "prompts.txt"), "TWICE": str(tmp_path / "twice.jsonl")}  # fmt: skip
    assert main(["eval", *(names.get(a, a) for a in args), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_wan22_ti2v_evaluates_text_to_video_without_first_frames_and_image_to_video_with_them(tmp_path):
    frame = random_image(tmp_path / "first.png", 3)
    argv = ["eval", "tiny:wan22_ti2v", "--steps", "1", "--no-teacher", "--metrics", "diversity", "--num-samples", "2"]
    assert main([*argv, "--out", str(tmp_path / "t2v")]) == 0
    assert main([*argv, "--out", str(tmp_path / "i2v"), "--images", str(frame)]) == 0
    report = json.loads((tmp_path / "i2v" / "eval.json").read_text())
    model = report["models"][report["rows"][0]["model"]]
    assert model["family"] == "wan22_ti2v" and len(model["first_frames_sha256"]) == 64
    assert np.abs(grid(tmp_path / "t2v") - grid(tmp_path / "i2v")).max() > 10
