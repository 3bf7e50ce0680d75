"""The teacher reference on the shipped digits teacher: its samples are the harness row's, its features are cached
under a key of everything that changes them, a cache hit samples nothing, and its report row."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fewstep.eval.classifier import benchmark_dataset, load_classifier
from fewstep.eval.coverage import Diversity
from fewstep.eval.features import ClassifierFeatures, FeatureExtractor
from fewstep.eval.harness import balanced_labels, evaluate, sample_images
from fewstep.eval.samplers import teacher_sampler
from fewstep.eval.suite import build_metrics
from fewstep.eval.teacher_reference import TeacherReference
from fewstep.eval.weights import module_sha256
from fewstep.models.loading import load_teacher
from tests.helpers import single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def sampler():
    teacher = load_teacher(SimpleNamespace(pretrained="fewstep:digits-vp"))
    return teacher_sampler(teacher, [2], guidance_scale=2.0, source="fewstep:digits-vp")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    classifier = load_classifier(benchmark_dataset("digits").classifier)
    return FeatureExtractor(ClassifierFeatures(classifier, classifier.preprocess, name="digits-classifier"))


def test_sample_images_are_the_rows_images(sampler):
    inputs = balanced_labels(12, 10)
    images, nfe = sample_images(sampler, 2, inputs, seed=3, batch_size=5)
    row = evaluate([sampler], [], inputs, seed=3, batch_size=5, grid_images=12, progress=False).rows[0]
    assert images.dtype == torch.uint8 and torch.equal(images.float() / 255, row.preview) and nfe == 4


def test_reference_is_cached_by_everything_that_changes_it(sampler, extractor, tmp_path, monkeypatch):
    inputs = balanced_labels(20, 10)
    reference = TeacherReference(sampler, 2, inputs, extractor, seed=1, batch_size=8, cache_dir=tmp_path)
    first = reference.load()
    images, _ = sample_images(sampler, 2, inputs, seed=1, batch_size=8)
    assert not first.cache_hit and first.path.is_file() and first.path.with_suffix(".json").is_file()
    torch.testing.assert_close(first.features, extractor(images.float() / 255, remember=False))
    assert first.groups.tolist() == inputs.labels.tolist() and torch.equal(first.preview, images[:16])
    assert first.info["nfe_per_image"] == 4 and first.info["key"]["guidance_scale"] == 2.0

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cache hit must not sample")

    monkeypatch.setattr(sampler, "fn", no_sampling)
    again = TeacherReference(sampler, 2, inputs, extractor, seed=1, batch_size=32, cache_dir=tmp_path).load()
    assert again.cache_hit and again.path == first.path and torch.equal(again.features, first.features)
    others = [TeacherReference(sampler, 2, inputs, extractor, seed=2, cache_dir=tmp_path),
              TeacherReference(sampler, 4, inputs, extractor, seed=1, cache_dir=tmp_path),
              TeacherReference(sampler, 2, balanced_labels(30, 10), extractor, seed=1, cache_dir=tmp_path)]  # fmt: skip
    assert len({first.path, *(o.path() for o in others)}) == 4


def test_reference_row_measures_the_cached_features(sampler, extractor, tmp_path):
    inputs = balanced_labels(20, 10)
    reference = TeacherReference(sampler, 2, inputs, extractor, seed=0, cache_dir=tmp_path)
    fid, accuracy = build_metrics(["fid", "accuracy"], "digits", "class")
    diversity = Diversity(extractor, by="labels")
    reference.load(image_metrics=[accuracy])  # accuracy needs the images: computed while they exist, then cached
    row = reference.row([fid, accuracy, diversity])
    rows = evaluate([sampler], [fid, accuracy, diversity], inputs, progress=False, grid_images=4).rows
    assert row.model == "teacher (DDIM, w=2) · reference" and row.num_steps == 2 and row.nfe_per_image == 4
    assert row.metrics == pytest.approx(rows[0].metrics, rel=1e-6)  # the same images, measured from the cache
    fresh = TeacherReference(sampler, 2, inputs, extractor, seed=0, cache_dir=tmp_path)
    assert set(fresh.row([fid, accuracy, diversity]).metrics) == {"fid", "accuracy", "diversity"}  # from the file


def test_the_teachers_hash_ignores_lora_adapters():
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with_lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), copy.deepcopy(base))
    assert any("lora_" in name for name in with_lora.state_dict())
    assert module_sha256(with_lora, without_adapters=True) == module_sha256(base, without_adapters=True)
    assert module_sha256(with_lora) != module_sha256(base) == module_sha256(base, without_adapters=True)
