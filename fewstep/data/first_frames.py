"""First frames for image-to-video teachers (Wan 2.1 I2V, Wan 2.2 TI2V-5B), taken from the training data.

* Clips: the first frame of each clip is its image, as pixels, never decoded back from latents. WebDataset shards
  take ``clip[:, :, 0]`` of the decoded clip; video folders read frame 0 of the file through the same decoder and crop
  (``fewstep.data.video_folder.clip_first_frames``, equal to the clip's pixels ``[:, 0]``), kept beside its latents.
* Prompts (``data.source: prompts``): a ``.jsonl`` prompt file names an image per line, ``{"prompt": ..., "image":
  "frame.png"}`` (relative to the file); the prompt cache keys such rows on ``(prompt, image)``.
* Image folders and image shards (no frames) are refused, and so are caches of Wan 2.1 I2V data or of data with first
  frames (a cache keeps none): ``check_first_frame_source``.
* Evaluation (``fewstep eval --images``): one image for every prompt, a folder with one image per prompt, or the same
  prompts ``.jsonl`` (``read_first_frames``); each prompt gets one first frame.

Every first frame is prepared by the pipeline's own code (``fewstep.models.prompts.first_frame_conditioning``) for the
clip it conditions: a clip's own shape, or for prompts ``clip_size(teacher)``, the teacher's default video size, which
``prepare_video_data`` sets from ``data.num_frames`` and ``data.resolution`` and which ``latent_shape`` (DMD2's noise
for data-free batches, the sample grids) reads. ``objective.resolution`` would draw other latents: leave it unset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fewstep.models.conditioning import Conditioning
from fewstep.models.prompts import FIRST_FRAME_REQUIRED, IMAGE_TO_VIDEO_FAMILIES, first_frame_conditioning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what a folder of first frames is read from
JSONL_HINT = (
    'a .jsonl prompt file with one {"prompt": "...", "image": "first_frame.png"} object per line (the image path '
    "relative to the file)"
)
_IMAGES_HINT = f"an image (the first frame of every prompt), a folder with one image per prompt, or {JSONL_HINT}"


def takes_first_frames(teacher: Any) -> bool:
    """Whether the teacher generates from a first frame (``IMAGE_TO_VIDEO_FAMILIES``)."""
    return getattr(teacher, "family", None) in IMAGE_TO_VIDEO_FAMILIES


def needs_first_frames(teacher: Any) -> bool:
    """Whether the teacher cannot generate without one (``FIRST_FRAME_REQUIRED``: Wan 2.1 I2V)."""
    return getattr(teacher, "family", None) in FIRST_FRAME_REQUIRED


def clip_size(teacher: Any) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the clips the objective samples without data (``latent_shape``'s default)."""
    from fewstep.models.backbones import video_defaults

    return video_defaults(teacher.pipeline)


def with_first_frames(
    teacher: Any,
    cond: Conditioning,
    uncond: Conditioning | None,
    images: Any,
    num_frames: int,
    size: tuple[int, int],
) -> tuple[Conditioning, Conditioning | None]:
    """``(cond, uncond)`` with one first frame per row (``images``: PIL images or ``[b, 3, H, W]`` pixels in [-1, 1])
    for clips of ``num_frames`` at ``size = (height, width)``; both branches get it, as in the pipelines."""
    device = cond.prompt_embeds.device if cond.prompt_embeds is not None else None
    image = first_frame_conditioning(teacher.pipeline, images, num_frames, size).to(device)
    return cond.with_image_of(image), uncond.with_image_of(image) if uncond is not None else None


def with_clip_first_frames(
    teacher: Any, cond: Conditioning, uncond: Conditioning | None, clips: Tensor
) -> tuple[Conditioning, Conditioning | None]:
    """``with_first_frames`` of clips: pixels ``[b, 3, F, H, W]`` in [-1, 1] (what the VAE encodes), whose first frames
    ``clips[:, :, 0]`` are the images."""
    _, _, frames, height, width = clips.shape
    return with_first_frames(teacher, cond, uncond, clips[:, :, 0], frames, (height, width))


def check_first_frame_source(data_cfg: Any, teacher: Any, has_frames: bool = False, cache: bool = False) -> None:
    """Refuse, before any model work, data that cannot give an image-to-video teacher what it needs.

    Args:
        data_cfg: the recipe's ``data`` block.
        teacher: the teacher (nothing is checked for other families).
        has_frames: the data names first frames: a prompt set with images, or clips (for a cache: the data it is made
            of).
        cache: a cache is written from the data (reading one is ``data.source: cache``).

    Raises:
        ValueError: Wan 2.1 I2V from prompts without images; an image folder without ``data.num_frames``; a cache
            (written or read) for Wan 2.1 I2V, or of data with first frames for TI2V-5B (a cache keeps none).
    """
    if not takes_first_frames(teacher):
        return
    family, source = teacher.family, data_cfg.source
    if cache or source == "cache":
        if needs_first_frames(teacher) or has_frames:
            raise ValueError(
                f"A cache holds text embeddings and latents but no first frames, which the {family} teacher is "
                "conditioned on: train from the data itself (the video folder, or the prompts .jsonl with images)."
            )
        return
    if source == "prompts" and not has_frames and needs_first_frames(teacher):
        raise ValueError(
            f"The {family} teacher generates each clip from its first frame, but the prompts name no image: give "
            f"data.path as {JSONL_HINT}, or train on clips (a video folder or video shards with data.num_frames)."
        )
    video_buckets = bool(data_cfg.buckets) and not isinstance(data_cfg.buckets, str) and len(data_cfg.buckets[0]) == 3
    if source in ("image_folder", "webdataset") and data_cfg.num_frames is None and not video_buckets:
        raise ValueError(
            f"{'An image folder gives' if source == 'image_folder' else 'Image shards give'} single images, and the "
            f"{family} teacher would be given each one as its own first frame (nothing left to generate): train on "
            "clips (set data.num_frames), or from prompts with "
            f"first frames ({JSONL_HINT})."
        )


def read_first_frames(path: str | Path, prompts: Sequence[str] | None) -> tuple[list[str] | None, Any]:
    """The first frames ``path`` names for an evaluation, and the prompts they go with.

    * an image file: one first frame for every prompt;
    * a folder: its images (``IMAGE_SUFFIXES``) in file-name order, one per distinct prompt of ``prompts`` in order;
    * a prompts ``.jsonl`` with an ``"image"`` per line (``fewstep.data.prompts.PromptDataset``, as training reads
      it): its own prompts and their images, so ``prompts`` must be ``None``.

    Args:
        path: the image, folder or ``.jsonl`` file.
        prompts: the evaluation's prompts (``None``: the caller's defaults; a folder needs them).

    Returns:
        ``(prompts, first frames)``: the prompts (``prompts`` itself, or the ``.jsonl``'s), and an image path for every
        prompt or a ``{prompt: image path}`` dict (what the eval samplers' ``images=`` take).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without images or with another count than the prompts, a ``.jsonl`` naming no images
            or given with ``prompts``, a prompt named twice with two images, a file that is not an image.
    """
    from fewstep.data.prompts import PromptDataset

    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"--images {str(path)!r} does not exist: give {_IMAGES_HINT}.")
    if file.is_dir():
        if not prompts:
            raise ValueError(
                f"--images {str(path)!r} is a folder, one first frame per prompt in file-name order: give the prompts "
                "with --prompts FILE, or give --images an image or a prompts .jsonl."
            )
        images = sorted(p for p in file.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        distinct = list(dict.fromkeys(prompts))
        if not images or len(images) != len(distinct):
            raise ValueError(
                f"--images {str(path)!r} holds {len(images)} image(s) ({', '.join(IMAGE_SUFFIXES)}) for "
                f"{len(distinct)} prompt(s): a folder gives one first frame per prompt (in file-name order, the "
                f"prompts in the order of --prompts); or give {_IMAGES_HINT}."
            )
        return list(prompts), dict(zip(distinct, images, strict=True))
    if file.suffix.lower() == ".jsonl":
        if prompts is not None:
            raise ValueError(f"--images {str(path)!r} is a prompts .jsonl, which names the prompts itself: drop "
                             "--prompts, or give --images an image or a folder.")  # fmt: skip
        dataset = PromptDataset(path=file)
        if dataset.images is None:
            raise ValueError(f"--images {str(path)!r} names no first frame: give it as {JSONL_HINT}.")
        return dataset.prompts, first_frames_by_prompt(dataset.prompts, dataset.images, str(path))
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--images {str(path)!r} is not an image ({', '.join(IMAGE_SUFFIXES)}): give {_IMAGES_HINT}.")
    return list(prompts) if prompts is not None else None, file


def first_frames_by_prompt(prompts: Sequence[str], images: Sequence[Path], source: str) -> dict[str, Path]:
    """``{prompt: first frame}`` of a prompts ``.jsonl``'s rows. An evaluation conditions every sample of a prompt on
    one first frame, so a prompt named twice must name the same image (``ValueError`` otherwise)."""
    frames: dict[str, Path] = {}
    for prompt, image in zip(prompts, images, strict=True):
        if frames.setdefault(prompt, image) != image:
            raise ValueError(
                f"{source} names two first frames for the prompt {prompt!r} ({frames[prompt].name}, {image.name}); "
                "an evaluation pairs each prompt with one: make the prompts distinct (e.g. add what the image shows)."
            )
    return frames
