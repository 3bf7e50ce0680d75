"""CLIP score of generated images against their prompts: torchmetrics' ``CLIPScore`` with a local CLIP.

The model comes from ``fewstep.eval.weights.locate_clip`` (a local directory, ``$FEWSTEP_CLIP``, or a Hub id in
the local Hugging Face cache) and is handed to torchmetrics as a callable returning ``(model, processor)``, so
torchmetrics never downloads anything. On transformers 5, ``CLIPModel.get_image_features`` and
``get_text_features`` return output objects instead of tensors, which torchmetrics 1.9 cannot use;
``CLIPTensorFeatures`` returns their ``pooler_output`` (the projected embeddings).

The number is torchmetrics' convention: ``max(100 · mean_i cos(E_image_i, E_text_i), 0)`` (the clamp is on the
mean, not per pair as in Hessel et al.'s CLIP-S, whose weight is 2.5, not 100). Scores from different CLIP models
are not comparable: ``describe()`` records the model and its weights hash.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.eval.features import to_rgb
from fewstep.eval.weights import Weights, locate_clip

FORMULA = "max(100 * mean_i cos(E_image_i, E_text_i), 0)"


def _embeddings(output: Any) -> Tensor:
    """Tensor embeddings from ``get_*_features``: a tensor (transformers 4) or an output's ``pooler_output`` (5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"Cannot read CLIP embeddings from {type(output).__name__} (no `pooler_output`).")
    return pooled


class CLIPTensorFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return ``[b, projection_dim]`` tensors.

    Args:
        model: a ``transformers.CLIPModel``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return _embeddings(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return _embeddings(output)


def load_clip(weights: Weights | str | Path | None = None, allow_download: bool = False) -> tuple[nn.Module, Any]:
    """``(CLIPTensorFeatures, CLIPProcessor)`` from located weights (offline; frozen, eval mode).

    Args:
        weights: ``Weights`` from ``locate_clip``, or what ``locate_clip`` takes (a directory or a Hub id).
        allow_download: let a Hub id download.
    """
    from transformers import CLIPModel, CLIPProcessor

    if not isinstance(weights, Weights):
        weights = locate_clip(weights, allow_download=allow_download)
    model = CLIPModel.from_pretrained(str(weights.path), local_files_only=True)
    processor = CLIPProcessor.from_pretrained(str(weights.path), local_files_only=True)
    return CLIPTensorFeatures(model).eval().requires_grad_(False), processor


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images ``[n, 1|3, h, w]`` in ``[0, 1]`` → ``[n, 3, h, w]`` uint8, as a saved PNG holds them."""
    return (to_rgb(images.float().clamp(0, 1)) * 255).round().to(torch.uint8)


class CLIPScoreMetric:
    """CLIP score (torchmetrics ``CLIPScore``) of images against their prompts, with a local CLIP model.

    Args:
        model: a CLIP directory or Hub id (see ``locate_clip``), or located ``Weights``; ``None``: ``$FEWSTEP_CLIP``,
            else ``DEFAULT_CLIP`` from the local Hugging Face cache.
        allow_download: let a Hub id download.
        batch_size: image-prompt pairs per model call.
        device: where CLIP runs.
        name: the report's column name.
    """

    needs = frozenset({"prompts"})
    higher_is_better = True

    def __init__(
        self,
        model: Weights | str | Path | None = None,
        allow_download: bool = False,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        name: str = "clip_score",
    ) -> None:
        self.weights = model if isinstance(model, Weights) else locate_clip(model, allow_download=allow_download)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.name = name
        self._metric: Any = None
        self.num_images: int | None = None

    def _torchmetrics(self) -> Any:
        if self._metric is None:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self._metric = CLIPScore(model_name_or_path=lambda: load_clip(self.weights)).to(self.device)
        return self._metric

    def compute(self, images: Tensor, labels: Tensor | None = None, prompts: Sequence[str] | None = None) -> float:
        """CLIP score of ``images`` (``[n, c, h, w]`` in ``[0, 1]``) against ``prompts`` (n strings)."""
        if prompts is None:
            raise ValueError(
                "CLIP score needs the prompts the images were generated from: pass `prompts=` (n strings)."
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not isinstance(images, Tensor) or images.ndim != 4 or len(images) != len(prompts) or not prompts:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"CLIP score takes images [n, c, h, w] and n prompts; got images {shape}, {len(prompts)}.")
        metric = self._torchmetrics()
        metric.reset()
        pixels = to_uint8_rgb(images).to(self.device)
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                metric.update(pixels[start:stop], prompts[start:stop])
        self.num_images = len(prompts)
        return float(metric.compute())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "implementation": "torchmetrics",
            "version": _version("torchmetrics"),
            "class": "CLIPScore",
            "formula": FORMULA,
            "model": self.weights.describe(),
            "transformers": _version("transformers"),
            "image_input": "8-bit RGB through the model's own CLIPProcessor (resize, center crop, normalise)",
            "num_images": self.num_images,
        }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["FORMULA", "CLIPScoreMetric", "CLIPTensorFeatures", "load_clip", "to_uint8_rgb"]
