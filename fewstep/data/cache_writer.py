"""``build_cache``: encode a recipe's data once into a cache directory (the format is in ``fewstep.data.cache``).

* One process, or ``accelerate launch`` with N ranks: the shards still to write are dealt out in turn (rank r writes
  the r-th, (r+N)-th, ... of them), so ranks never write the same file and share the work evenly, also on a resume.
* Resumable: a shard is written to a temporary name and renamed, so a shard file that exists is finished; a second run
  keeps those and writes the rest. The layout depends only on the data and ``shard_size``, not on the number of ranks.
* A directory holding a cache made otherwise (another teacher or encoders, dtype, resolution, data, caption column or
  shard size) is refused with what differs and the command to rebuild it (``overwrite=True``).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.data.cache import (
    CACHEABLE,
    DEFAULT_DIRNAME,
    FORMAT,
    MANIFEST,
    NULL_FILE,
    conditioning_tensors,
    fingerprint,
    identity_differences,
    plan_shards,
    read_manifest,
    source_differences,
    source_items,
    stale,
    teacher_identity,
    write_atomic,
)
from fewstep.data.first_frames import check_first_frame_source
from fewstep.data.image_folder import encode_items
from fewstep.data.prompts import PromptDataset
from fewstep.data.video_folder import encode_clips, prepare_video_data
from fewstep.models.conditioning import UNBATCHED_FIELDS

DEFAULT_SHARD_SIZE = 256  # items per shard file
DEFAULT_BATCH_SIZE = 16  # items per encoder call


def check_cacheable(data_cfg: Any) -> None:
    """Refuse data that has no text embeddings or VAE latents to cache (digits, Fashion-MNIST, tensors, pairs)."""
    if data_cfg.source not in (*CACHEABLE, "cache"):
        raise ValueError(
            f"data.source: {data_cfg.source} has nothing to cache: caches hold the text embeddings and VAE latents of "
            f"{' or '.join(CACHEABLE)} data."
        )


def cache_source(data_cfg: Any) -> dict[str, Any]:
    """What a recipe's ``data`` block asks to cache: ``kind``, ``path``, ``prompts``, ``caption_column`` and
    ``resolution``. A ``data.source: cache`` block names its own cache, whose manifest says what it was made of (so the
    training recipe rebuilds its cache); its ``data.resolution``, if set, replaces the cache's."""
    if data_cfg.source == "cache":
        made = read_manifest(data_cfg.path)["source"]
        if made.get("path") is None:
            raise ValueError(
                f"The cache {data_cfg.path} was made from prompts listed in a recipe (data.prompts), which it does "
                "not keep: run `fewstep cache` on that recipe (with data.source: prompts) to rebuild it."
            )
        resolution = data_cfg.resolution if data_cfg.resolution is not None else made.get("resolution")
        return {"kind": made["kind"], "path": made["path"], "prompts": None,
                "caption_column": made.get("caption_column", "text"), "resolution": resolution,
                "video": made.get("video")}  # fmt: skip
    check_cacheable(data_cfg)
    video = None
    if data_cfg.source == "image_folder" and data_cfg.num_frames is not None:  # a video folder: its clips' latents
        video = {"num_frames": data_cfg.num_frames, "frame_stride": data_cfg.frame_stride}
    return {"kind": data_cfg.source, "path": data_cfg.path, "prompts": data_cfg.prompts,
            "caption_column": data_cfg.caption_column, "resolution": data_cfg.resolution, "video": video}  # fmt: skip


def default_cache_dir(data_cfg: Any) -> Path:
    """Where a cache goes without ``--out``: ``<image folder>/.fewstep_cache``, ``<prompt file>.fewstep_cache`` next to
    a prompt file, or the ``data.path`` of a ``data.source: cache`` recipe."""
    check_cacheable(data_cfg)
    if data_cfg.source == "cache":
        return Path(data_cfg.path).expanduser()
    if data_cfg.path is None:
        raise ValueError("The prompts are listed in the recipe (data.prompts), so there is no data.path to put the "
                         "cache next to: give --out DIR.")  # fmt: skip
    path = Path(data_cfg.path).expanduser()
    return path / DEFAULT_DIRNAME if path.is_dir() else path.with_name(path.name + DEFAULT_DIRNAME)


def _ours(name: str) -> bool:
    """Files a cache directory may hold: the manifest, the null file, shards, temporary files of writers."""
    return name in (MANIFEST, NULL_FILE) or name.endswith(".tmp") or (name.startswith("shard-") and name.endswith(
        ".safetensors"))  # fmt: skip


def check_directory(root: Path, manifest: dict[str, Any], keys: list[str], overwrite: bool, rebuild: str) -> None:
    """Refuse ``root`` when it is a file, holds files that are not a cache's, or holds a cache made otherwise (unless
    ``overwrite``). Reads only: every rank runs it."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"The cache directory {root} is a file; give --out a directory.")
    if not root.is_dir():
        return
    if not (root / MANIFEST).is_file():
        foreign = sorted(p.name for p in root.iterdir() if not _ours(p.name))
        if foreign:
            raise ValueError(
                f"{root} holds files that are not a fewstep cache (e.g. {foreign[0]}) and no {MANIFEST}; fewstep "
                "writes caches only into new or empty directories. Give --out another one."
            )
        return
    if overwrite:
        return
    cached = read_manifest(root)
    differences = identity_differences(cached, manifest)
    if not differences:
        differences = source_differences(cached["source"], cached["shards"], keys)
    if differences:
        raise stale(root, differences, rebuild)


def prepare_directory(root: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Create ``root``, drop the temporary files of killed writers (and with ``overwrite`` the old cache), and write the
    manifest if there is none. Main process only, before any rank writes a shard."""
    root.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if path.name.endswith(".tmp") or (overwrite and _ours(path.name)):
            path.unlink()
    if not (root / MANIFEST).is_file():
        tmp = root / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, root / MANIFEST)


def encode_shard(
    teacher: Any,
    items: list[tuple],
    resolution: int | None,
    batch_size: int,
    num_workers: int,
    bar: Any,
    video: dict[str, int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """One shard's tensors and metadata: the items encoded ``batch_size`` at a time exactly as the training data path
    encodes them (``encode_items`` / ``encode_clips`` with ``video`` through the VAE, ``encode_prompts`` through the
    text encoders).

    Raises:
        ValueError: a video that passed the folder's probe fails to decode (a cache holds every item it lists)."""
    from fewstep.models.prompts import encode_prompts
    from fewstep.models.vae import encode_images

    device = next(teacher.denoiser.backbone.parameters()).device
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        files, captions = [item[0] for item in chunk], [item[1] for item in chunk]
        part = {}
        encode = partial(encode_images, teacher)
        if files[0] is not None and video is not None:
            clips, failed = encode_clips(files, resolution, video["num_frames"], video["frame_stride"], encode,
                                         None, device, num_workers)  # fmt: skip
            if failed:
                i, why = next(iter(failed.items()))
                raise ValueError(f"{files[i]}: {why}. Fix or remove it (its line in metadata.jsonl), then rerun.")
            part["latents"] = torch.stack(clips)  # [n, c, f, h, w]
        elif files[0] is not None:
            part["latents"] = encode_items(files, resolution, encode, None, device, num_workers).cpu()  # [n, c, h, w]
        with torch.no_grad():
            cond, uncond = encode_prompts(teacher, captions, resolution=resolution)
        part |= conditioning_tensors("cond", cond) | conditioning_tensors("uncond", uncond)
        parts.append({k: v.cpu() for k, v in part.items()})
        bar.update(len(chunk))
    tensors, shared, unbatched = {}, [], []
    for key in parts[0]:
        if key.split(".", 1)[-1] in UNBATCHED_FIELDS:  # Flux's txt_ids: one for the whole batch
            tensors[key] = parts[0][key]
            unbatched.append(key)
            continue
        rows = torch.cat([part[key] for part in parts])
        if key != "latents" and torch.equal(rows, rows[:1].expand_as(rows)):  # e.g. the null branch: stored once
            tensors[key] = rows[:1].clone()
            shared.append(key)
        else:
            tensors[key] = rows
    metadata = {"captions": json.dumps([item[1] for item in items]), "shared": json.dumps(shared),
                "unbatched": json.dumps(unbatched)}  # fmt: skip
    return tensors, metadata


def build_cache(
    recipe: Any,
    out: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Encode ``recipe.data`` with ``recipe.teacher``'s text encoders and VAE into a cache; returns its directory.

    Args:
        recipe: a validated recipe with ``data.source`` ``image_folder``, ``prompts`` or ``cache`` (rebuild that
            cache from the data its manifest names).
        out: the cache directory (default ``default_cache_dir``).
        shard_size: items per shard file.
        batch_size: items per encoder call.
        overwrite: replace a cache made otherwise instead of refusing it.
        progress: show a progress bar (main process).
        command: the command that makes this cache, recorded in the manifest and named in errors.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from fewstep.models.loading import load_teacher

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1; got {shard_size} and {batch_size}.")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    source = cache_source(recipe.data)
    root = Path(out).expanduser() if out is not None else default_cache_dir(recipe.data)
    items = source_items(source["kind"], source["path"], source["prompts"], source["caption_column"], source["video"])
    keys = [item[2] for item in items]
    teacher_id = teacher_identity(recipe.teacher)
    if not any(name.startswith("text_encoder") for name in teacher_id["encoders"]):
        raise ValueError(f"{recipe.teacher.pretrained!r} has no text encoder: caches are for text-to-image teachers.")
    path = str(Path(source["path"]).expanduser().resolve()) if source["path"] is not None else None
    manifest = {
        "format": FORMAT, "teacher": teacher_id, "resolution": source["resolution"],
        "source": {"kind": source["kind"], "path": path, "num_items": len(keys), "fingerprint": fingerprint(keys),
                   **({"caption_column": source["caption_column"]} if source["kind"] == "image_folder" else {}),
                   **({"video": source["video"]} if source.get("video") else {})},
        "shard_size": shard_size, "shards": plan_shards(keys, shard_size), "command": command,
    }  # fmt: skip
    rebuild = f"{command or 'fewstep cache RECIPE --out ' + str(root)} --overwrite"
    check_directory(root, manifest, keys, overwrite, rebuild)
    if state.is_main_process:
        prepare_directory(root, manifest, overwrite)
    state.wait_for_everyone()

    teacher = load_teacher(recipe.teacher)
    prepare_video_data(recipe.data, teacher)  # clips the VAE cannot take are refused before any encoding
    named = source["kind"] == "prompts" and PromptDataset(source["prompts"], source["path"]).images is not None
    check_first_frame_source(recipe.data, teacher, bool(source["video"]) or named, cache=True)  # none are cached
    teacher.denoiser.to(state.device)
    teacher.pipeline.to(state.device)
    if state.is_main_process and not (root / NULL_FILE).is_file():
        write_atomic(root / NULL_FILE, conditioning_tensors("null", teacher.null_cond))
    shards = manifest["shards"]
    todo = [k for k, shard in enumerate(shards) if not (root / shard["file"]).is_file()]
    state.wait_for_everyone()  # every rank has listed what is left before any rank writes
    mine = todo[state.process_index :: state.num_processes]
    total = sum(shards[k]["count"] for k in mine)
    with tqdm(total=total, desc="cache", unit="item", disable=not (progress and state.is_main_process)) as bar:
        for k in mine:
            first, count = shards[k]["first"], shards[k]["count"]
            chunk = items[first : first + count]
            tensors, metadata = encode_shard(
                teacher, chunk, source["resolution"], batch_size, recipe.data.num_workers, bar, source["video"]
            )
            write_atomic(root / shards[k]["file"], tensors, metadata | {"rank": str(state.process_index)})
    state.wait_for_everyone()
    return root
