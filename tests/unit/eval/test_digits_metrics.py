"""Digits metrics: FID in the shipped classifier's feature space, class accuracy, and the benchmark table of the
quickstart (harness rows, the same numbers as ``DigitsMetrics``)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.eval.digits import DigitsClassifier, DigitsMetrics, digits_images, to_model_range
from fewstep.eval.harness import EvalInputs, Sampler, balanced_labels, data_row, evaluate, to_uint8
from fewstep.eval.report import Row, benchmark_record, format_benchmark_table
from fewstep.eval.suite import build_metrics


@pytest.fixture(scope="module")
def metrics() -> DigitsMetrics:
    return DigitsMetrics()


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": digits_images("train"), "test": digits_images("test")}


def test_images_are_in_unit_range_with_balanced_splits(splits):
    (train, _), (test, y_test) = splits["train"], splits["test"]
    assert train.shape == (1617, 1, 8, 8) and test.shape == (180, 1, 8, 8)
    assert train.min() >= 0 and train.max() <= 1 and train.max() == 1
    assert set(y_test.tolist()) == set(range(10))


def test_fid_of_identical_sets_is_zero(metrics, splits):
    test = splits["test"][0]
    assert abs(metrics.fid(test, test)) < 1e-6


def test_fid_of_different_sets_is_positive_and_symmetric(metrics, splits):
    train, test = splits["train"][0], splits["test"][0]
    ab, ba = metrics.fid(train, test), metrics.fid(test, train)
    assert ab > 0.5
    assert ab == pytest.approx(ba, rel=1e-6)
    # The cached reference (train split) gives the same number as a fresh computation.
    assert metrics.fid_to_reference(test) == pytest.approx(ab, rel=1e-6)


def test_held_out_digits_are_classified_correctly(metrics, splits):
    test, labels = splits["test"]
    assert metrics.accuracy(test, labels) > 0.9
    # Shuffled labels are chance level: the accuracy measures class adherence.
    assert metrics.accuracy(test, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]) < 0.3


def test_noise_is_far_from_real_digits(metrics, splits):
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    real = metrics.fid_to_reference(splits["test"][0])
    assert metrics.fid_to_reference(noise) > 10 * real
    # Blurring real digits towards their class mean degrades FID monotonically; accuracy stays high.
    test, labels = splits["test"]
    means = torch.stack([test[labels == c].mean(0) for c in range(10)])[labels]
    fids = [metrics.fid_to_reference((1 - a) * test + a * means) for a in (0.0, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2]
    assert metrics.accuracy(means, labels) > 0.9


def test_inputs_out_of_range_are_clamped_and_shapes_checked(metrics, splits):
    test = splits["test"][0][:50]
    assert metrics.fid(test, test * 3 - 1) == pytest.approx(metrics.fid(test, (test * 3 - 1).clamp(0, 1)))
    rgb = test.expand(-1, 3, -1, -1)
    assert torch.equal(to_model_range(rgb), to_model_range(test))
    with pytest.raises(ValueError, match=r"\[b, 1, 8, 8\]"):
        to_model_range(torch.zeros(2, 1, 16, 16))


def test_classifier_save_load_round_trip(tmp_path):
    model = DigitsClassifier(width=8, num_features=16).eval()
    x = torch.randn(4, 1, 8, 8)
    model.save(tmp_path / "clf", test_accuracy=0.5)
    loaded = DigitsClassifier.load(tmp_path / "clf")
    assert torch.equal(loaded(x), model(x))
    assert loaded.features(x).shape == (4, 16)
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        DigitsClassifier.load(tmp_path / "missing")


def test_benchmark_table_of_harness_rows(metrics, splits):
    train, y_train = splits["train"]
    by_class = [train[y_train == c] for c in range(10)]

    def real(noise, inputs, num_steps, generator):  # a "model" that returns real digits of the asked class
        labels = inputs.labels
        picks = [by_class[int(y)][(i * 7 + num_steps) % len(by_class[int(y)])] for i, y in enumerate(labels)]
        return torch.stack(picks)

    def noisy(noise, inputs, num_steps, generator):
        return (noise / 4 + 0.5).clamp(0, 1)

    benchmark = build_metrics(None, "digits", "class")  # fid, accuracy: the harness's digits metrics
    test, y_test = splits["test"]
    samplers = [Sampler("real", real, (1, 8, 8), [1, 2]), Sampler("noise", noisy, (1, 8, 8), [1])]
    report = evaluate(samplers, benchmark, balanced_labels(200, 10), batch_size=64, grid_images=5, warmup=False,
                      timing_repeats=1, progress=False)  # fmt: skip
    rows = [data_row("digits test split (real)", test, benchmark, EvalInputs(labels=y_test)), *report.rows]
    assert [(r.model, r.num_steps) for r in rows] == [
        ("digits test split (real)", None),
        ("real", 1),
        ("real", 2),
        ("noise", 1),
    ]
    fid, accuracy = [r.metrics["fid"] for r in rows], [r.metrics["accuracy"] for r in rows]
    assert all(math.isfinite(f) and 0 <= a <= 1 for f, a in zip(fid, accuracy))
    assert accuracy[1] > 0.95 and accuracy[3] < 0.5
    assert fid[3] > 5 * fid[1]
    # The same numbers as DigitsMetrics on the 8-bit images the harness measures.
    quantised = to_uint8(test).float() / 255
    assert fid[0] == pytest.approx(metrics.fid_to_reference(quantised), rel=1e-5)
    assert accuracy[0] == metrics.accuracy(quantised, y_test)
    assert rows[1].preview.shape == (5, 1, 8, 8) and rows[0].preview is None
    assert rows[1].seconds_per_image >= 0 and rows[0].seconds_per_image is None

    record = benchmark_record(rows[1])
    assert list(record) == ["model", "num_steps", "fid", "accuracy", "seconds_per_1k_images", "num_images"]
    assert record["seconds_per_1k_images"] == pytest.approx(rows[1].seconds_per_image * 1000)
    assert benchmark_record(rows[0])["seconds_per_1k_images"] is None and record["num_images"] == 200

    table = format_benchmark_table(rows, ["- a note"])
    lines = table.splitlines()
    assert lines[:2] == ["| model | steps | FID ↓ | accuracy ↑ | s / 1,000 images |",
                         "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    assert len([line for line in lines if line.startswith("| ")]) == 2 + len(rows)
    assert f"| real | 2 | {fid[2]:.2f} | {accuracy[2]:.3f} |" in table and lines[-1] == "- a note"
    assert lines[2].endswith("| – | " + f"{fid[0]:.2f} | {accuracy[0]:.3f} | – |")  # no steps, no timing


def test_benchmark_table_prints_non_finite_values():
    row = Row("broken", 1, 10, None, 1e-3, None, {"fid": float("nan"), "accuracy": 0.0})
    assert "| broken | 1 | nan | 0.000 | 1.00 |" in format_benchmark_table([row])
