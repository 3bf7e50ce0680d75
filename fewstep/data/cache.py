"""Precomputed caches of a recipe's text embeddings and VAE latents, and training from them.

``fewstep cache RECIPE`` (``fewstep.data.cache_writer.build_cache``) encodes the recipe's data once with the teacher's
own encoders. A cache is a directory:

* ``manifest.json``: what made it (the teacher, the class and config hash of each text encoder and of the VAE, the
  dtype, the resolution, the source data with its fingerprint and item count) and the shard list;
* ``null.safetensors``: the teacher's null conditioning (the empty prompt's encoding that CFG uses);
* ``shard-00000.safetensors`` ...: ``shard_size`` consecutive items each: ``latents`` ``[n, c, h, w]`` (image data
  only; ``[n, c, f, h, w]`` for a video folder, whose manifest records ``num_frames`` and ``frame_stride``),
  ``cond.<field>`` and ``uncond.<field>`` for every ``Conditioning`` field the backbone takes (Flux's embedded guidance
  excepted: it is the recipe's, not an encoder's, and is filled in from the teacher), and the captions in the
  file's metadata. A field equal for every item of a shard (the null branch of most pipelines) is stored once.

The cache is complete when every shard of the manifest and the null file exist. Training from it (``data.source:
cache``, ``data.path`` the directory) loads the teacher without its text encoders and VAE (``load_cached_teacher``) and
reads batches straight from the shards (``CachedDataset``), after checking that the recipe's teacher, dtype and
resolution and the source data (when it is still there) are the ones the cache was made with.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fewstep.data.image_folder import ImageFolderDataset
from fewstep.data.prompts import PromptDataset
from fewstep.data.video_folder import VideoFolderDataset
from fewstep.models.conditioning import Conditioning
from fewstep.models.loading import encoder_identity, is_hub_id, pipeline_index, resolve_pretrained

FORMAT = 1
MANIFEST = "manifest.json"
NULL_FILE = "null.safetensors"
DEFAULT_DIRNAME = ".fewstep_cache"  # inside an image folder (its metadata.jsonl lists the images, so it is never read)
CACHEABLE = ("image_folder", "prompts")  # the data sources a cache can be made of
NOT_CACHED_FIELDS = ("guidance", "extra")  # Flux's embedded guidance is set from the teacher; extra is for custom ones
REBUILD = "fewstep cache RECIPE --overwrite"  # with a data.source: cache recipe it rebuilds from the manifest's source
OPEN_SHARDS = 64  # shard files a reader keeps open


class StaleCacheError(ValueError):
    """A cache made by other encoders, at another resolution or from other data than a recipe asks for."""


# ---------------------------------------------------------------------------------------------------------------------
# Identity: what a cache was made with
# ---------------------------------------------------------------------------------------------------------------------


def teacher_key(pretrained: str) -> str:
    """``teacher.pretrained`` as a cache records it: ``tiny:`` / ``fewstep:`` names and Hub ids as written, local
    directories as absolute paths (so ``./teacher`` and ``/work/teacher`` agree)."""
    if pretrained.startswith(("tiny:", "fewstep:")):
        return pretrained
    spec = resolve_pretrained(pretrained)
    return spec if is_hub_id(spec) else str(Path(spec).resolve())


def teacher_identity(teacher_cfg: Any) -> dict[str, Any]:
    """The recipe's teacher as a cache records it (read from config files, no weights): spec, revision, variant,
    dtype, pipeline class, and ``encoders``: class and config hash of each text encoder and the VAE."""
    index = pipeline_index(teacher_cfg.pretrained, teacher_cfg.revision)
    return {
        "pretrained": teacher_key(teacher_cfg.pretrained),
        "revision": teacher_cfg.revision,
        "variant": teacher_cfg.variant,
        "dtype": teacher_cfg.dtype,
        "pipeline": index.get("_class_name"),
        "encoders": encoder_identity(teacher_cfg.pretrained, teacher_cfg.revision),
    }


def source_items(
    kind: str,
    path: str | None,
    prompts: list[str] | None,
    caption_column: str = "text",
    video: dict[str, int] | None = None,
) -> list[tuple]:
    """The items of a cacheable source, in order: ``(image file or None, caption, fingerprint key)``. An image's key
    is its name in the folder, caption, size and modification time; a prompt's key is the prompt. With ``video``
    (``{"num_frames", "frame_stride"}``) the folder holds videos, and only those that give a clip are items."""
    if kind == "image_folder":
        if video:
            folder = VideoFolderDataset(path, caption_column, video["num_frames"], video["frame_stride"])
        else:
            folder = ImageFolderDataset(path, caption_column)
        items = []
        for file, caption in folder.items:
            stat = file.stat()
            key = f"{file.relative_to(folder.root).as_posix()}|{caption}|{stat.st_size}|{stat.st_mtime_ns}"
            items.append((file, caption, key))
        return items
    if kind == "prompts":
        return [(None, p, p) for p in PromptDataset(prompts, path).prompts]
    raise ValueError(f"data.source: {kind} cannot be cached; caches are made of {', '.join(CACHEABLE)} data.")


def fingerprint(keys: list[str]) -> str:
    """sha256 of item keys (``source_items``), one a line."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def plan_shards(keys: list[str], shard_size: int) -> list[dict[str, Any]]:
    """Consecutive items in shards of ``shard_size``: file name, first item, count and fingerprint of each."""
    return [
        {"file": f"shard-{k:05d}.safetensors", "first": first, "count": len(keys[first : first + shard_size]),
         "fingerprint": fingerprint(keys[first : first + shard_size])}
        for k, first in enumerate(range(0, len(keys), shard_size))
    ]  # fmt: skip


def source_differences(source: dict[str, Any], shards: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """How the source data now (``keys``) differs from what the cache holds: item count, changed shards."""
    if len(keys) != source["num_items"]:
        return [f"the {source['kind']} data now has {len(keys)} items, the cache {source['num_items']}"]
    if fingerprint(keys) == source["fingerprint"]:
        return []
    changed = [s for s in shards if fingerprint(keys[s["first"] : s["first"] + s["count"]]) != s["fingerprint"]]
    first = changed[0] if changed else shards[0]
    return [
        f"the {source['kind']} data changed in {len(changed)} shard(s), first items {first['first']}-"
        f"{first['first'] + first['count'] - 1} (added, removed, renamed, edited or re-captioned files)"
    ]


def identity_differences(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two manifests besides the data itself (``source_differences``): the teacher and its
    encoders, the resolution, the kind of source and its caption column, the shard size; one phrase each."""
    out = []
    if cached.get("format") != wanted.get("format"):
        return [f"cache format {cached.get('format')}, this fewstep writes {wanted.get('format')}"]
    old_t, new_t = cached["teacher"], wanted["teacher"]
    for key in ("pretrained", "revision", "variant", "dtype", "pipeline"):
        if old_t.get(key) != new_t.get(key):
            out.append(f"teacher {key}: cache {old_t.get(key)!r}, now {new_t.get(key)!r}")
    old_e, new_e = old_t["encoders"], new_t["encoders"]
    for name in sorted(set(old_e) | set(new_e)):
        if old_e.get(name) != new_e.get(name):
            was, now = (e[name]["class"] if name in e else "none" for e in (old_e, new_e))
            out.append(f"{name}: cache {was}, now {now}" if was != now else f"{name} ({now}): another config")
    if cached.get("resolution") != wanted.get("resolution"):
        out.append(f"resolution: cache {cached.get('resolution')}, now {wanted.get('resolution')}")
    old_s, new_s = cached["source"], wanted["source"]
    for key in ("kind", "caption_column", "video"):
        if old_s.get(key) != new_s.get(key):
            out.append(f"source {key}: cache {old_s.get(key)!r}, now {new_s.get(key)!r}")
    if cached.get("shard_size") != wanted.get("shard_size"):
        out.append(f"shard size: cache {cached.get('shard_size')}, now {wanted.get('shard_size')}")
    return out


def stale(directory: Path, differences: list[str], rebuild: str) -> StaleCacheError:
    """The one-line error for a stale cache: what differs and the command that rebuilds it."""
    return StaleCacheError(f"The cache {directory} is stale: {'; '.join(differences)}. Rebuild it: {rebuild}")


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """A cache's manifest (``FileNotFoundError`` / ``ValueError`` naming the fix when it is missing or foreign)."""
    path = Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist, so {str(path.parent)!r} is not a fewstep cache. Write one with "
            "`fewstep cache RECIPE --out DIR` (the recipe's image_folder or prompts data)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable cache manifest ({err}). Rebuild the cache: {REBUILD}.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "shards" not in manifest:
        raise ValueError(f"{path} is not a fewstep cache manifest of format {FORMAT}. Rebuild the cache: {REBUILD}.")
    return manifest


def missing_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """The files of a cache that are not written yet (an interrupted ``fewstep cache``)."""
    names = [NULL_FILE, *(s["file"] for s in manifest["shards"])]
    return [n for n in names if not (directory / n).is_file()]


def write_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``save_file`` to a unique temporary name, then rename: a reader never sees half a file, and a killed writer
    leaves only a ``*.tmp`` that the next run removes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def conditioning_tensors(prefix: str, cond: Conditioning) -> dict[str, Tensor]:
    """``{prefix.field: tensor}`` for every field a cache keeps (see ``NOT_CACHED_FIELDS``)."""
    return {
        f"{prefix}.{name}": value for name, value in vars(cond).items()
        if name not in NOT_CACHED_FIELDS and isinstance(value, Tensor)
    }  # fmt: skip


def conditioning_from(prefix: str, tensors: dict[str, Tensor]) -> Conditioning | None:
    """The ``Conditioning`` of the ``prefix.*`` tensors (``None`` when there are none)."""
    fields = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return Conditioning(**fields) if fields else None


def read_null(directory: Path) -> Conditioning:
    """The null conditioning stored with a cache."""
    return conditioning_from("null", load_file(directory / NULL_FILE))


def open_cache(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """A complete cache's directory and manifest; an incomplete one is refused with the command that finishes it."""
    root = Path(directory).expanduser()
    manifest = read_manifest(root)
    missing = missing_files(root, manifest)
    if missing:
        raise FileNotFoundError(
            f"The cache {root} is incomplete: {len(missing)} of {len(manifest['shards']) + 1} files are missing "
            f"(first {missing[0]}); `fewstep cache` was interrupted. Finish it (finished shards are kept): "
            f"{manifest.get('command') or 'fewstep cache RECIPE --out ' + str(root)}"
        )
    return root, manifest


class CachedDataset:
    """The items of a complete cache: ``batch(idx)`` gives ``(x0 or None, cond, uncond or None)`` on the CPU, as the
    source data would give them through the teacher's encoders; ``captions(idx)`` the captions or prompts.

    Shards are memory-mapped and read item by item (``safetensors.safe_open``), so a cache larger than memory works;
    the ``OPEN_SHARDS`` most recently read stay open.
    """

    def __init__(self, directory: str | Path) -> None:
        self.root, self.manifest = open_cache(directory)
        self.shards = self.manifest["shards"]
        self._firsts = [s["first"] for s in self.shards]
        self._open: OrderedDict[int, tuple[Any, set[str], set[str], list[str]]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.manifest["source"]["num_items"])

    def _shard(self, k: int) -> tuple[Any, set[str], set[str], list[str]]:
        """Shard ``k``'s open file, its shared and unbatched keys and its captions."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        handle = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
        meta = handle.metadata() or {}
        shared, unbatched = (set(json.loads(meta.get(key, "[]"))) for key in ("shared", "unbatched"))
        self._open[k] = (handle, shared, unbatched, json.loads(meta.get("captions", "[]")))
        if len(self._open) > OPEN_SHARDS:  # a large cache read in random order: bounded file handles
            self._open.popitem(last=False)
        return self._open[k]

    def _locate(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._firsts, i) - 1
        return k, i - self._firsts[k]

    def captions(self, idx: list[int]) -> list[str]:
        return [self._shard(k)[3][row] for k, row in map(self._locate, idx)]

    def batch(self, idx: list[int]) -> tuple[Tensor | None, Conditioning, Conditioning | None]:
        rows: dict[str, list[Tensor]] = {}
        shared_values: dict[str, Tensor] = {}
        for k, row in map(self._locate, idx):
            handle, shared, unbatched, _ = self._shard(k)
            for key in handle.keys():
                if key in unbatched:
                    shared_values.setdefault(key, handle.get_tensor(key))
                else:
                    r = 0 if key in shared else row
                    rows.setdefault(key, []).append(handle.get_slice(key)[r : r + 1])
        tensors = {key: torch.cat(parts) for key, parts in rows.items()} | shared_values
        return tensors.get("latents"), conditioning_from("cond", tensors), conditioning_from("uncond", tensors)


# ---------------------------------------------------------------------------------------------------------------------
# Training from a cache
# ---------------------------------------------------------------------------------------------------------------------


def training_differences(manifest: dict[str, Any], recipe: Any) -> list[str]:
    """What keeps a recipe from training on a cache: another teacher or encoders, dtype, resolution, or changed
    source data (checked when the source is still where the cache was made from)."""
    wanted = dict(manifest, teacher=teacher_identity(recipe.teacher))
    if recipe.data.resolution is not None:
        wanted["resolution"] = recipe.data.resolution
    source = manifest["source"]
    if recipe.data.num_frames is not None and source.get("video") is not None:  # clips: the cache's frames
        video = {"num_frames": recipe.data.num_frames, "frame_stride": recipe.data.frame_stride}
        wanted["source"] = dict(source, video=video)
    out = identity_differences(manifest, wanted)
    path = source.get("path")
    if path is not None and Path(path).exists():
        items = source_items(source["kind"], path, None, source.get("caption_column", "text"), source.get("video"))
        keys = [key for *_, key in items]
        out += source_differences(source, manifest["shards"], keys)
    return out


def load_cached_teacher(recipe: Any) -> Any:
    """The recipe's teacher without its text encoders and VAE, with the cache's null conditioning, after checking
    that the cache (``data.path``) was made by this teacher at this resolution from the data as it is now.

    Raises:
        StaleCacheError: the cache was made otherwise; the message says what differs and how to rebuild it.
    """
    from fewstep.models.loading import load_teacher

    root, manifest = open_cache(recipe.data.path)
    differences = training_differences(manifest, recipe)
    if differences:
        source = manifest["source"]
        made_from = f"{source['kind']} {source['path']}" if source.get("path") else "the recipe's data.prompts"
        raise stale(root, differences, f"`{REBUILD}` with this run's recipe and overrides (re-encodes {made_from})")
    return load_teacher(recipe.teacher, encoders=False, null_cond=read_null(root))
