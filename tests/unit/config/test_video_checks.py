"""``fewstep validate`` reports a video recipe's clip shape against its teacher before anything trains: a frame count
the VAE cannot take (Wan 4k + 1, LTX-Video 8k + 1), a resolution off the VAE factor × patch size, ``data.num_frames`` on
an image teacher; each with the nearest valid values. Only the teacher's configs are read, never its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewstep.cli.main import main
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)


def write_recipe(tmp_path: Path, teacher: str, **data) -> str:
    recipe = {
        "teacher": {"pretrained": teacher, "guidance_scale": 2.0},
        "student": {"kind": "lora", "lora": {"rank": 4}},
        "objective": {"name": "dmd2", "health_reference_steps": 0},
        "data": {"source": "prompts", "prompts": ["a cat"], "batch_size": 1, **data},
        "train": {"max_steps": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def validate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["validate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any pipeline's weights fails the test: validate reads configs only."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("fewstep validate loaded weights")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr("fewstep.models.loading.load_pipeline", refuse)


@pytest.mark.parametrize(
    ("teacher", "data", "needles"),
    [
        ("tiny:wan21", {"num_frames": 80}, ["data.num_frames: 80 frames do not fit the wan21 VAE", "use 77 or 81"]),
        (
            "tiny:wan21",
            {"num_frames": 81, "resolution": 40},
            ["data.resolution: resolution 40 is not a multiple of 16", "use 32 or 48"],
        ),
        ("tiny:ltx", {"num_frames": 12}, ["(8k + 1 frames): use 9 or 17"]),
        ("tiny:wan22_ti2v", {"resolution": 48}, ["resolution 48 is not a multiple of 32", "use 32 or 64"]),
        ("tiny:sd15", {"num_frames": 5}, ["data.num_frames: asks for video, but the teacher 'sd15' is an image model"]),
        # the configs shipped for a Hub id: Wan 2.1 T2V 14B, nothing downloaded
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", {"num_frames": 80}, ["wan21 VAE", "use 77 or 81"]),
    ],
    ids=["wan_frames", "wan_side", "ltx_frames", "ti2v_side", "image_teacher", "shipped_configs"],
)
def test_clips_the_teacher_cannot_take_are_reported_with_the_fix(tmp_path, capsys, no_weights, teacher, data, needles):
    code, out, err = validate(capsys, write_recipe(tmp_path, teacher, **data))
    assert code == 2 and not out and "Traceback" not in err
    assert "error: 1 error in recipe" in err  # after the tiny zoo's build bar on its first use
    for needle in needles:
        assert needle in err, (needle, err)


def test_every_clip_problem_is_reported_at_once_and_the_fixed_recipe_passes(tmp_path, capsys, no_weights):
    recipe = write_recipe(tmp_path, "tiny:wan21", num_frames=80, resolution=40)
    code, _, err = validate(capsys, recipe)
    assert code == 2 and "error: 2 errors in recipe" in err
    assert "- data.num_frames: 80 frames" in err and "- data.resolution: resolution 40" in err

    code, out, err = validate(capsys, recipe, "data.num_frames=81", "data.resolution=32")
    assert code == 0 and out.startswith("valid: ") and "error" not in err
    assert validate(capsys, recipe, "data.num_frames=81", "data.resolution=32", "teacher.pretrained=tiny:ltx")[0] == 0
    # the LTX VAE takes 8k + 1 frames: 81 = 8·10 + 1 fits, 77 does not
    code, _, err = validate(capsys, recipe, "data.num_frames=77", "data.resolution=64", "teacher.pretrained=tiny:ltx")
    assert code == 2 and "use 73 or 81" in err


def test_a_teacher_without_configs_here_is_left_to_training(tmp_path, capsys, no_weights):
    # a Hub id neither shipped nor in the local cache: nothing to read the clip rules from, nothing is downloaded
    code, out, _ = validate(capsys, write_recipe(tmp_path, "someone/unknown-video-model", num_frames=80))
    assert code == 0 and out.startswith("valid: ")
    assert "note: data.num_frames was not checked against the teacher: no configs for 'someone/unknown" in out
    assert "huggingface-cli download someone/unknown-video-model --include '*.json'" in out


def test_an_image_recipe_with_a_resolution_builds_no_pipeline(tmp_path, capsys, monkeypatch):
    # its model_index.json names no 3-D backbone, so no video rule applies and diffusers' pipelines stay unimported
    monkeypatch.setattr("fewstep.plan.meta.config_teacher", lambda *a, **k: pytest.fail("a pipeline was built"))
    code, out, _ = validate(capsys, write_recipe(tmp_path, "tiny:sd15", resolution=30))
    assert code == 0 and out.startswith("valid: ")
