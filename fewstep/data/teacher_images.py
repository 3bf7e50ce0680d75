"""A starter image folder drawn from the teacher itself, in the layout ``data.source: image_folder`` reads: PNG files
and a ``metadata.jsonl`` with ``file_name`` and the caption column.

For the objectives that learn from image latents (LCM, PCM / Hyper-SD, sCM, rCM, DMD2's GAN term) when no images of
your own are at hand. The images are the stock diffusers pipeline's (``pipe(prompt, ...)``), at its own default step
count and guidance unless given. Image ``i`` takes prompt ``i mod len(prompts)`` and its own generator seeded
``seed + i`` (on the CPU), so it starts from the same noise whatever the batch size or device, and an interrupted
run continues where it stopped. ``fewstep_data.json`` records the settings and the next index: a folder
written with other settings, or one holding images of your own, is refused instead of mixed. Images the pipeline's
safety checker flags (it returns them black) are left out.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fewstep.data.image_folder import METADATA

SETTINGS_FILE = "fewstep_data.json"


def pipeline_defaults(pipe: Any) -> tuple[int, float]:
    """The pipeline call's own defaults: ``(num_inference_steps, guidance_scale)`` (50 and 7.5 for SD1.5)."""
    params = inspect.signature(pipe.__call__).parameters
    return int(params["num_inference_steps"].default), float(params["guidance_scale"].default)


def write_teacher_images(
    pipe: Any,
    out_dir: str | Path,
    prompts: Sequence[str],
    num_images: int,
    *,
    resolution: int | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    caption_column: str = "text",
    teacher: str = "",
    progress: bool = True,
) -> Path:
    """Sample ``num_images`` images from a text-to-image pipeline into ``out_dir`` with their prompts as captions.

    Args:
        pipe: a diffusers text-to-image pipeline (SD1.5, SDXL, SD3, Flux), on the device it should run on.
        out_dir: the image folder (created); a folder this function wrote with the same settings is continued.
        prompts: the captions, used in turn.
        num_images: images the folder holds when done.
        resolution: height and width in pixels (default: the pipeline's).
        num_steps, guidance_scale: the pipeline call's (default: its own defaults; guidance in its convention,
            ``guidance_scale`` of the diffusers pipeline).
        seed: image ``i`` is drawn with ``torch.Generator().manual_seed(seed + i)``.
        batch_size: images per pipeline call.
        caption_column: the caption key of ``metadata.jsonl`` (``data.caption_column``).
        teacher: the teacher's name, recorded in the settings.
        progress: show a progress bar (on a terminal).

    Raises:
        FileExistsError: ``out_dir`` holds a ``metadata.jsonl`` this function did not write, or one written with
            other settings.
        ValueError: no prompts, or ``num_images`` / ``batch_size`` below 1.
    """
    prompts = [str(p) for p in prompts if str(p).strip()]
    if not prompts:
        raise ValueError("No prompts to draw images for: give a prompt file (one a line).")
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1; got {num_images} and {batch_size}.")
    default_steps, default_guidance = pipeline_defaults(pipe)
    settings = {
        "teacher": teacher,
        "resolution": resolution,
        "num_inference_steps": int(num_steps or default_steps),
        "guidance_scale": float(default_guidance if guidance_scale is None else guidance_scale),
        "seed": int(seed),
        "caption_column": caption_column,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
    }
    out = Path(out_dir).expanduser()
    rows, next_index = _resume(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    call: dict[str, Any] = {"num_inference_steps": settings["num_inference_steps"]}
    call["guidance_scale"] = settings["guidance_scale"]
    if resolution is not None:
        call.update(height=resolution, width=resolution)
    pipe.set_progress_bar_config(disable=True)  # one bar over the images instead of one per call
    bar = tqdm(total=num_images, initial=min(len(rows), num_images), desc="images", disable=None if progress else True)
    try:
        while len(rows) < num_images:
            indices = range(next_index, next_index + min(batch_size, num_images - len(rows)))
            generators = [torch.Generator().manual_seed(seed + i) for i in indices]
            batch_prompts = [prompts[i % len(prompts)] for i in indices]
            result = pipe(prompt=batch_prompts, generator=generators, **call)
            flagged = getattr(result, "nsfw_content_detected", None) or [False] * len(indices)
            for i, prompt, image, bad in zip(indices, batch_prompts, result.images, flagged):
                if bad:  # a safety checker's black image is no training data
                    continue
                name = f"{i:06d}.png"
                image.save(out / name)
                rows.append({"file_name": name, caption_column: prompt})
                bar.update(1)
            next_index = indices[-1] + 1
            _write_state(out, rows, settings, next_index)  # after the images it lists
    finally:
        bar.close()
    return out


def check_not_foreign(out_dir: str | Path) -> None:
    """Refuse a folder that holds a ``metadata.jsonl`` this module did not write (a user's own images): nothing is
    ever added to it. Cheap, so callers can run it before they load a pipeline.

    Raises:
        FileExistsError: naming the folder and what to do.
    """
    out = Path(out_dir).expanduser()
    if (out / METADATA).exists() and not (out / SETTINGS_FILE).is_file():
        raise FileExistsError(
            f"{str(out)!r} holds a {METADATA} that fewstep data did not write (your own images?): nothing is "
            "added to it. Point data.path at another folder to draw teacher images there."
        )


def _resume(out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The rows already written and the next image index, for a folder this module wrote with ``settings``."""
    check_not_foreign(out)
    meta, state_file = out / METADATA, out / SETTINGS_FILE
    if not state_file.is_file():
        return [], 0
    state = json.loads(state_file.read_text())
    if state.get("settings") != settings:
        before = state.get("settings") or {}
        changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        raise FileExistsError(
            f"{str(out)!r} was drawn with other settings ({', '.join(changed)} differ): it is not mixed with new "
            "images. Use the same settings to continue it, or another folder (data.path) for new ones."
        )
    text = meta.read_text(encoding="utf-8") if meta.is_file() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows, int(state["next_index"])


def _write_state(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], next_index: int) -> None:
    """``fewstep_data.json``, then ``metadata.jsonl``, each replaced whole: a kill between the two leaves images that
    no line lists (the next images take new indices), never a line listed twice."""
    state = json.dumps({"settings": settings, "next_index": next_index}, indent=2)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for name, text in ((SETTINGS_FILE, state), (METADATA, lines)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
