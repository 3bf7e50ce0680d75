"""The evaluation harness on the shipped digits teacher: exact NFE (CFG counts 2), shared noise, every
comparability field in the report, images and grids on disk, clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.eval.harness import EvalInputs, Sampler, balanced_labels, data_row, evaluate, shared_noise
from fewstep.eval.report import EvalReport, format_report, format_table
from fewstep.eval.samplers import teacher_sampler
from fewstep.eval.suite import build_metrics
from fewstep.models.loading import load_teacher
from fewstep.models.teacher import GUIDANCE_CONVENTION
from tests.helpers import single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp"))


@pytest.fixture(scope="module")
def report(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    guided = teacher_sampler(teacher, [1, 4], guidance_scale=2.0, source="fewstep:digits-vp")
    plain = teacher_sampler(teacher, [4], guidance_scale=1.0, source="fewstep:digits-vp")
    metrics = build_metrics(None, "digits", "class")
    # 20 images in batches of 8, 8, 4: NFE must stay exact with a partial batch.
    rep = evaluate([guided, plain], metrics, balanced_labels(20, 10), seed=3, batch_size=8, out_dir=out,
                   grid_images=10, timing_repeats=3, progress=False, info={"target": {"kind": "test"}})  # fmt: skip
    return rep, out


def test_nfe_is_exact_and_cfg_counts_two(report):
    rep, _ = report
    nfe = {(r.model, r.num_steps): r.nfe_per_image for r in rep.rows}
    assert nfe == {("teacher (DDIM, w=2)", 1): 2, ("teacher (DDIM, w=2)", 4): 8, ("teacher (DDIM, w=1)", 4): 4}
    for row in rep.rows:
        assert row.num_images == 20 and row.seconds_per_image > 0 and row.peak_memory_mib >= 0
        assert set(row.metrics) == {"fid", "accuracy", "precision", "recall", "diversity"}
        assert row.metrics["fid"] > 0 and 0 <= row.metrics["accuracy"] <= 1 and row.metrics["diversity"] > 0
        assert 0 <= row.metrics["precision"] <= 1 and 0 <= row.metrics["recall"] <= 1
    # The 4-step guided teacher is a good digits sampler: the classifier recognises its labels.
    assert rep.value("accuracy", "teacher (DDIM, w=2)", 4) >= 0.9
    assert rep.value("fid", "teacher (DDIM, w=2)", 4) < rep.value("fid", "teacher (DDIM, w=2)", 1)


def test_report_records_everything_that_makes_numbers_comparable(report):
    _, out = report
    data = json.loads((out / "eval.json").read_text())
    assert data["num_samples"] == 20 and data["seed"] == 3 and data["batch_size"] == 8
    assert "manual_seed(3)" in data["noise"] and data["inputs"]["per_class"] == [2] * 10
    assert data["guidance_convention"] == GUIDANCE_CONVENTION
    fid, acc = data["metrics"]["fid"], data["metrics"]["accuracy"]
    assert fid["higher_is_better"] is False and acc["higher_is_better"] is True
    assert fid["implementation"] == "torchmetrics" and fid["version"]
    assert fid["feature_network"]["weights_sha256"] and fid["num_reference_images"] == 1617
    assert "train" in fid["reference"]["name"]
    model = data["models"]["teacher (DDIM, w=2)"]
    assert model["guidance_scale"] == 2.0 and model["weights"] == "pretrained" and model["noise_shape"] == [1, 8, 8]
    assert model["scheduler"] == "DDIM (η=0), trailing grid" and model["source"] == "fewstep:digits-vp"
    env = data["environment"]
    assert env["fewstep"] and env["torch"] == torch.__version__ and env["diffusers"] and env["device"] == "cpu"
    assert env["date"][:2] == "20" and "peak RSS" in data["memory"]
    rows = data["rows"]
    assert rows[1]["schedule"]["timesteps"] == [999, 749, 499, 249]  # trailing DDIM at 4 steps
    assert rows[1]["schedule"]["levels"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert data["target"] == {"kind": "test"}

    md = (out / "eval.md").read_text()
    assert "| model | steps | NFE | fid ↓ | accuracy ↑ | precision ↑ | recall ↑ | diversity ↑ | ms / image |" in md
    assert "| teacher (DDIM, w=2) | 4 | 8 |" in md and GUIDANCE_CONVENTION in md
    assert "digits-classifier" in md and "trailing grid" in md and "torch " + torch.__version__ in md


def test_images_and_grids_are_written(report):
    rep, out = report
    for row in rep.rows:
        files = sorted((out / row.images_dir).glob("*.png"))
        assert len(files) == 20 and files[0].name == "00000.png"
        assert np.array(Image.open(files[0])).shape == (8, 8)
        grid = Image.open(out / row.grid)
        assert grid.size == (10 * 64, 64)  # 10 tiles, 8×8 digits enlarged 8× (MIN_TILE_PIXELS)
    overview = Image.open(out / "grid.png")
    assert overview.size == (10 * 64, 3 * 64)  # one row per table row
    # The saved PNGs are what the metrics saw: 8-bit images of the first grid row equal the preview.
    first = np.array(Image.open(out / rep.rows[0].images_dir / "00000.png"))
    assert np.array_equal(first, (rep.rows[0].preview[0, 0].numpy() * 255).round().astype(np.uint8))


def test_samplers_share_noise_and_batch_size_does_not_change_images(teacher):
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def recorder(key: str):
        def fn(noise, inputs, num_steps, generator):
            seen[key].append(noise.clone())
            return (noise.clamp(-1, 1) + 1) / 2

        return fn

    samplers = [Sampler(k, recorder(k), (1, 8, 8), [1]) for k in ("a", "b")]
    evaluate(samplers, [], EvalInputs(num_samples=5), seed=7, batch_size=2, warmup=False, timing_repeats=1,
             progress=False)  # fmt: skip
    a, b = torch.cat(seen["a"]), torch.cat(seen["b"])
    assert torch.equal(a, b) and torch.equal(a, shared_noise(5, (1, 8, 8), 7))
    rows = evaluate(samplers, [], EvalInputs(num_samples=1), progress=False).rows
    assert [r.nfe_per_image for r in rows] == [None, None]  # no network given: NFE is not counted

    sampler = teacher_sampler(teacher, [2], guidance_scale=2.0)
    small = evaluate([sampler], [], balanced_labels(6, 10), batch_size=2, progress=False, timing_repeats=1)
    large = evaluate([sampler], [], balanced_labels(6, 10), batch_size=6, progress=False, timing_repeats=1)
    assert torch.allclose(small.rows[0].preview, large.rows[0].preview, atol=1.5 / 255)


def test_clear_errors_for_metrics_the_inputs_cannot_feed(teacher):
    sampler = teacher_sampler(teacher, [1])
    metrics = build_metrics(["accuracy"], "digits", "class")
    with pytest.raises(ValueError, match="metric 'accuracy' needs labels but the inputs have none"):
        evaluate([sampler], metrics, EvalInputs(num_samples=4), progress=False)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate([sampler, sampler], [], balanced_labels(4, 10), progress=False)
    with pytest.raises(ValueError, match="Did you mean 'fid'"):
        build_metrics(["fdi"], "digits", "class")
    with pytest.raises(ValueError, match="`clip` \\(CLIP score\\) needs a text-conditioned model"):
        build_metrics(["clip", "accuracy"], "digits", "class")
    with pytest.raises(ValueError, match="`fid` needs reference images"):
        build_metrics(["fid"], None, "text")
    assert build_metrics(None, None, "text") == []


def test_table_formats_missing_values():
    rep = evaluate([Sampler("x", lambda n, i, s, g: torch.zeros(len(n), 1, 2, 2), (1, 2, 2), [3])], [],
                   EvalInputs(num_samples=2), progress=False, warmup=False, timing_repeats=1)  # fmt: skip
    table = format_table(rep)
    assert table.splitlines()[0] == "| model | steps | NFE | ms / image | peak MiB |"
    assert table.splitlines()[2].startswith("| x | 3 | – | ")


def test_a_data_row_has_no_steps_nfe_or_timing_in_the_tables():
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    row = data_row("real images", images, [], EvalInputs(num_samples=4))
    assert (row.num_steps, row.nfe_per_image, row.seconds_per_image, row.num_images) == (None, None, None, 4)
    report = EvalReport([row], {})
    assert format_table(report).splitlines()[2] == "| real images | – | – | – | – |"
    assert "| real images | – | – |" in format_report(report)


class _FrameRecorder:
    """A metric that keeps what it was given: the frames a video row is measured on and their prompts."""

    name, needs, higher_is_better = "seen", frozenset({"prompts"}), True

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.prompts: list[list[str]] = []

    def compute(self, images, labels=None, prompts=None) -> float:
        self.images.append(images)
        self.prompts.append(list(prompts))
        return float(images.mean())

    def describe(self) -> dict:
        return {}


def test_video_rows_are_measured_frame_by_frame_and_written_as_clips(tmp_path):
    def clips(noise, inputs, num_steps, generator):  # [b, 3, 3 frames, 4, 4]: frame k is k / 2 everywhere
        frames = torch.arange(3, dtype=torch.float32).view(1, 1, 3, 1, 1) / 2
        return frames.expand(len(noise), 3, 3, 4, 4)

    metric = _FrameRecorder()
    inputs = EvalInputs(prompts=["a cat", "a dog"])
    rep = evaluate([Sampler("video", clips, (2, 1, 1, 1), [1])], [metric], inputs, out_dir=tmp_path, progress=False,
                   warmup=False, timing_repeats=1, grid_images=4)  # fmt: skip
    (row,) = rep.rows
    (frames,) = metric.images
    assert frames.shape == (6, 3, 4, 4) and row.num_images == 2  # 2 clips of 3 frames; the row counts clips
    assert metric.prompts == [["a cat"] * 3 + ["a dog"] * 3]  # every frame carries its clip's prompt
    torch.testing.assert_close(frames[:3, 0, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))  # clip by clip, 8-bit
    assert row.preview.shape == (4, 3, 4, 4)  # the grid shows the first clip's frames, then the next
    written = sorted(p.name for p in (tmp_path / row.images_dir).iterdir())
    assert len(written) == 2 and written[0].split(".")[1] in ("mp4", "webp")
    assert (tmp_path / "grid.png").is_file()
    assert "frame by frame" in json.loads((tmp_path / "eval.json").read_text())["images"]
