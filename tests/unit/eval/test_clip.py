"""CLIP score with torchmetrics and a tiny random CLIP saved offline: equal to the hand computation from the same
model's embeddings (random weights make no claim about matching prompts), batching, describe(), errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.eval.clip import FORMULA, CLIPScoreMetric, CLIPTensorFeatures, load_clip, to_uint8_rgb
from fewstep.eval.metric import Metric
from fewstep.eval.weights import CLIP_ENV, WeightsNotFoundError, file_sha256
from fewstep.testing.tokenizer import clip_tokenizer

PROMPTS = ["a red square", "a photo of a cat", "digit seven", "two dogs on a beach", "blue sky", "a small boat"]


def _image_processor(size: int):
    try:  # transformers 5 without torchvision: the PIL backend (CLIPImageProcessor would fall back to it, noisily)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel (2 layers, width 32, 16-d projections, 32×32 images) + processor, saved to a directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    directory = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=_image_processor(32), tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(len(PROMPTS), 3, 24, 24, generator=torch.Generator().manual_seed(0))


def hand_cosines(directory: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(E_image_i, E_text_j) ``[n_images, n_prompts]`` from the raw transformers model and processor."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(directory, local_files_only=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.no_grad():
        image_inputs = processor(images=list(pixels), return_tensors="pt")
        text_inputs = processor(text=prompts, return_tensors="pt", padding=True)
        e_image = model.get_image_features(pixel_values=image_inputs["pixel_values"])
        e_text = model.get_text_features(
            input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"]
        )
    e_image = getattr(e_image, "pooler_output", e_image)  # transformers 5 returns an output object
    e_text = getattr(e_text, "pooler_output", e_text)
    e_image = e_image / e_image.norm(dim=-1, keepdim=True)
    e_text = e_text / e_text.norm(dim=-1, keepdim=True)
    return e_image @ e_text.T


def test_score_equals_the_hand_computation(tiny_clip, images):
    """Random weights: no claim that true captions score higher. The pairing with each image's best (worst) prompt
    gives a positive (negative) mean cosine, so both sides of torchmetrics' max(100 · mean cos, 0) are checked."""
    metric = CLIPScoreMetric(tiny_clip)
    assert isinstance(metric, Metric) and metric.needs == frozenset({"prompts"}) and metric.higher_is_better
    cos = hand_cosines(tiny_clip, images, PROMPTS)  # [6, 6]
    best, worst = cos.argmax(1), cos.argmin(1)
    rows = torch.arange(len(images))
    best_mean, worst_mean = cos[rows, best].mean().item(), cos[rows, worst].mean().item()
    assert best_mean > 0 > worst_mean
    value = metric.compute(images, prompts=[PROMPTS[j] for j in best])
    assert value == pytest.approx(100 * best_mean, abs=1e-3)
    assert metric.compute(images, prompts=[PROMPTS[j] for j in worst]) == 0.0  # the clamp is on the mean
    # Batches accumulate to the same number.
    batched = CLIPScoreMetric(tiny_clip, batch_size=4).compute(images, prompts=[PROMPTS[j] for j in best])
    assert batched == pytest.approx(value, abs=1e-3)


def test_grey_images_are_scored_as_rgb(tiny_clip, images):
    metric = CLIPScoreMetric(tiny_clip)
    grey = images[:, :1]
    prompts = PROMPTS[::-1]
    assert metric.compute(grey, prompts=prompts) == metric.compute(grey.expand(-1, 3, -1, -1), prompts=prompts)
    cos = hand_cosines(tiny_clip, grey.expand(-1, 3, -1, -1), prompts).diagonal()
    assert metric.compute(grey, prompts=prompts) == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-3)


def test_wrapper_returns_tensors_and_loads_offline(tiny_clip):
    model, processor = load_clip(tiny_clip)
    assert isinstance(model, CLIPTensorFeatures) and not model.training
    inputs = processor(text=["a cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        pixels = processor(images=[torch.zeros(3, 32, 32, dtype=torch.uint8)], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixels)
    assert isinstance(text, torch.Tensor) and text.shape == (1, 16) and image.shape == (1, 16)
    assert model.config.projection_dim == 16


def test_describe_records_model_hash_and_formula(tiny_clip, images, monkeypatch):
    monkeypatch.setenv(CLIP_ENV, str(tiny_clip))
    metric = CLIPScoreMetric()  # from $FEWSTEP_CLIP
    metric.compute(images[:2], prompts=PROMPTS[:2])
    info = metric.describe()
    assert info["implementation"] == "torchmetrics" and info["class"] == "CLIPScore" and info["formula"] == FORMULA
    assert info["model"]["source"] == "env FEWSTEP_CLIP" and info["model"]["path"] == str(tiny_clip.resolve())
    assert info["model"]["sha256"] == file_sha256(tiny_clip / "model.safetensors")
    assert info["num_images"] == 2 and info["version"] == "1.9.0" and info["transformers"]
    json.dumps(info)


def test_errors_say_what_is_missing(tiny_clip, images, tmp_path):
    metric = CLIPScoreMetric(tiny_clip)
    with pytest.raises(ValueError, match="needs the prompts"):
        metric.compute(images)
    with pytest.raises(ValueError, match="n prompts"):
        metric.compute(images, prompts=PROMPTS[:2])
    with pytest.raises(WeightsNotFoundError, match="FEWSTEP_CLIP"):
        CLIPScoreMetric(tmp_path / "no_clip")
    with pytest.raises(WeightsNotFoundError, match="'fewstep-tests/no-such-clip' is not in the local Hugging Face"):
        CLIPScoreMetric("fewstep-tests/no-such-clip")


def test_uint8_conversion_matches_a_saved_png():
    x = torch.tensor([[[[0.0, 0.5, 1.0, 1.7]]]])
    assert to_uint8_rgb(x).tolist() == [[[[0, 128, 255, 255]]] * 3]
