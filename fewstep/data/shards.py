"""WebDataset tar shards on a local (or mounted) file system: shard lists, a per-shard sample index, seeded in-shard
orders, raw sample reading from a given point, and writing an image folder as shards.

A sample is the group of consecutive tar members that share a key (the name up to the first dot of the base name:
``00000042.png`` + ``00000042.txt``), read with webdataset's own tar iterators, so the grouping is exactly the one
``webdataset.WebDataset`` uses.

The index is one pass over the tar headers (nothing is read or decoded): the number of samples of each shard, and
with ``sizes`` the ``(height, width)`` of each sample's image or video from its header (for buckets). It is kept in
``$FEWSTEP_CACHE/shards/<hash>.json``, the hash over the shard paths, sizes and modification times, so a changed shard
is indexed again. A ``counts.json`` beside the shards (``{"shard-000000.tar": 1000, ...}``, written by
``write_shards``) gives the counts without a pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fewstep.data.image_folder import ImageFolderDataset, fewstep_cache_dir

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv")
COUNTS_FILE = "counts.json"
INSTALL_HINT = "pip install 'fewstep[stream]' (or pip install webdataset)"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (``__key__``-style metadata)

Size = tuple[int, int]  # (height, width)


def require_webdataset() -> Any:
    """The ``webdataset`` module.

    Raises:
        ImportError: it is not installed (the message says how to install it).
    """
    try:
        import webdataset
    except ImportError as err:
        raise ImportError(f"data.source: webdataset needs the webdataset package: {INSTALL_HINT}.") from err
    return webdataset


def list_shards(path: str | Sequence[str]) -> list[Path]:
    """The shard files ``data.path`` names, in order: a brace pattern (``train-{000000..000009}.tar``), a directory
    (its ``*.tar`` files, sorted), a ``.txt`` file listing shards one a line (relative to the file), a single
    ``.tar``, or a list of any of these.

    Raises:
        ValueError: a remote URL (only local or mounted shards are read) or a path that names no shard.
        FileNotFoundError: a named shard does not exist.
    """
    expand_urls = require_webdataset().shardlists.expand_urls
    shards: list[Path] = []
    for entry in [path] if isinstance(path, str) else list(path):
        if "://" in entry or entry.startswith("pipe:"):
            raise ValueError(f"data.path {entry!r} is a URL; data.source: webdataset reads local or mounted shards.")
        where = Path(entry).expanduser()
        if where.is_dir():
            found = sorted(where.glob("*.tar"))
            if not found:
                raise ValueError(f"data.path {entry!r} is a directory without .tar shards.")
            shards += found
        elif where.suffix == ".txt" and where.is_file():
            lines = [ln.strip() for ln in where.read_text(encoding="utf-8").splitlines()]
            shards += [where.parent / ln for ln in lines if ln and not ln.startswith("#")]
        else:
            shards += [Path(p).expanduser() for p in expand_urls(entry)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"data.path names shards that do not exist: {', '.join(missing[:3])}{more}.")
    if not shards:
        raise ValueError(f"data.path {path!r} names no shard.")
    return shards


# --- the index ----------------------------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """Per shard: its sample count, and with sizes the ``(height, width)`` of each sample (None: none readable)."""

    counts: list[int]
    sizes: list[list[Size | None]] | None = None


def member_key(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a tar member as webdataset groups it; ``(None, None)`` for members it skips."""
    from webdataset.tariterators import base_plus_ext

    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None, None
    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext is not None else None)


def media_size(extension: str, file: IO[bytes]) -> Size | None:
    """``(height, width)`` of an image or video from its header (PIL; PyAV for video); None when unreadable."""
    try:
        if extension in VIDEO_EXTENSIONS:
            import av

            with av.open(file) as container:
                stream = container.streams.video[0]
                return stream.codec_context.height, stream.codec_context.width
        from PIL import Image

        with Image.open(file) as image:
            return image.height, image.width
    except Exception:  # any unreadable header: the sample has no size (it is skipped with buckets)
        return None


def scan_shard(path: Path, sizes: bool = False) -> list[Size | None]:
    """One entry per sample of the shard (its media size with ``sizes``, else None), from the tar headers."""
    entries: list[Size | None] = []
    current, sized = None, False
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = member_key(member.name) if member.isreg() else (None, None)
                if key is None:
                    continue
                if key != current:
                    entries.append(None)
                    current, sized = key, False
                if sizes and not sized and ext in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
                    entries[-1], sized = media_size(ext, tar.extractfile(member)), True
    except (tarfile.TarError, OSError) as err:
        logger.warning("shard %s is damaged after %d samples (%s); the rest of it is skipped", path, len(entries), err)
    return entries


def index_shards(shards: Sequence[Path], sizes: bool = False) -> ShardIndex:
    """The counts (and sizes) of ``shards``: from their ``counts.json`` (counts only), the cache, or one header pass
    (written to the cache)."""
    from tqdm.auto import tqdm

    if not sizes:
        counts = _listed_counts(shards)
        if counts is not None:
            return ShardIndex(counts)
    identity = [(str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns) for s in shards]
    digest = hashlib.sha1(json.dumps([identity, sizes]).encode()).hexdigest()[:20]
    cache = fewstep_cache_dir() / "shards" / f"{digest}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        table = [[tuple(s) if s is not None else None for s in shard] for shard in saved["sizes"]] if sizes else None
        return ShardIndex(saved["counts"], table)
    bar = tqdm(shards, desc="indexing shards", unit="shard", disable=len(shards) < 8)
    entries = [scan_shard(s, sizes) for s in bar]
    index = ShardIndex([len(e) for e in entries], entries if sizes else None)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"shards": [i[0] for i in identity], "counts": index.counts, "sizes": index.sizes}, f)
    os.replace(tmp, cache)  # atomic: ranks indexing at once never read half a file
    return index


def _listed_counts(shards: Sequence[Path]) -> list[int] | None:
    """Counts from the ``counts.json`` beside each shard, or None when one is not listed."""
    tables: dict[Path, dict[str, int]] = {}
    counts = []
    for shard in shards:
        if shard.parent not in tables:
            file = shard.parent / COUNTS_FILE
            tables[shard.parent] = json.loads(file.read_text()) if file.is_file() else {}
        if shard.name not in tables[shard.parent]:
            return None
        counts.append(int(tables[shard.parent][shard.name]))
    return counts


# --- orders and reading --------------------------------------------------------------------------------------------


def buffer_order(num_samples: int, buffer: int, rng: Any) -> list[int]:
    """The order a shuffle buffer of ``buffer`` samples gives a shard read front to back: the buffer fills, then each
    new sample replaces one drawn at random (``rng``: a ``random.Random``). Only the order is computed, so a reader can
    start at any point of it. With ``buffer >= num_samples`` it is a uniform permutation."""
    order, pool = [], []
    for i in range(num_samples):
        pool.append(i)
        if len(pool) >= buffer:
            j = rng.randrange(len(pool))
            pool[j], pool[-1] = pool[-1], pool[j]
            order.append(pool.pop())
    while pool:
        j = rng.randrange(len(pool))
        pool[j], pool[-1] = pool[-1], pool[j]
        order.append(pool.pop())
    return order


def iter_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The raw samples of a shard in file order (``{"__key__": ..., "png": bytes, "txt": bytes, ...}``), through
    webdataset's tar iterators. A damaged tar ends the samples where the damage is (the sample read before it is
    still yielded), then raises."""
    from webdataset.handlers import ignore_and_continue, reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_expander

    damage: list[Exception] = []

    def files(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
        try:
            yield from tar_file_expander([{"url": str(path), "stream": stream}], handler=reraise_exception)
        except (tarfile.TarError, OSError) as err:
            damage.append(err)

    with open(path, "rb") as stream:
        yield from group_by_keys(files(stream), handler=ignore_and_continue)  # a duplicate member is dropped
    if damage:
        raise damage[0]


def read_plan(path: Path, plan: Sequence[int], offset: int = 0) -> Iterator[dict[str, Any] | None]:
    """The raw samples at ``plan[offset:]`` (indices into the shard's file order; repeats allowed), in that order.

    The shard is read front to back once; a sample is kept only until its last place in the plan. Samples before
    ``offset`` are passed over without being decoded. A place whose sample the shard does not hold (damaged, or
    fewer samples than indexed) yields None."""
    wanted = list(plan[offset:])
    needed = Counter(wanted)
    held: dict[int, dict[str, Any]] = {}
    k = 0

    def release(i: int) -> None:
        needed[i] -= 1
        if not needed[i]:
            held.pop(i, None)

    try:
        for i, sample in enumerate(iter_samples(path)):
            if k >= len(wanted):
                break
            if needed[i]:
                held[i] = sample
            while k < len(wanted) and wanted[k] in held:
                sample = held[wanted[k]]
                release(wanted[k])
                k += 1
                yield sample
    except (tarfile.TarError, OSError, ValueError) as err:
        why = err.args[0] if err.args else err  # webdataset appends the stream and url to the arguments
        logger.warning("shard %s could not be read to its end (%s); its remaining samples are skipped", path, why)
    for i in wanted[k:]:
        sample = held.get(i)
        release(i)
        yield sample


# --- writing ------------------------------------------------------------------------------------------------------


def write_shards(
    image_folder: str | Path, out_dir: str | Path, shard_size: int = 1000, caption_column: str = "text"
) -> list[Path]:
    """Write an image folder (images + ``metadata.jsonl``) as WebDataset shards ``shard-000000.tar``, ... in
    ``out_dir`` with webdataset's ``ShardWriter``, and their ``counts.json``.

    Each sample is ``<key>.<image extension>`` (the file's own bytes; other formats than jpg/png/webp are written as
    PNG), ``<key>.txt`` (the caption) and ``<key>.json`` (``{"file_name", <caption_column>}``).

    Returns:
        The shard paths.

    Raises:
        FileExistsError: ``out_dir`` holds shards already (nothing is overwritten).
        ValueError: ``shard_size < 1``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    wds = require_webdataset()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}.")
    dataset = ImageFolderDataset(image_folder, caption_column)
    out = Path(out_dir).expanduser()
    if out.is_dir() and any(out.glob("*.tar")):
        raise FileExistsError(f"{out} holds .tar shards already; give an empty or new directory.")
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for i, (file, caption) in enumerate(tqdm(dataset.items, desc="writing shards", unit="img")):
            ext = file.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            data = file.read_bytes()
            if ext not in IMAGE_EXTENSIONS:
                with Image.open(file) as image, io.BytesIO() as buffer:
                    image.save(buffer, format="PNG")
                    ext, data = "png", buffer.getvalue()
            row = {"file_name": str(file.relative_to(dataset.root)), caption_column: caption}
            sink.write({"__key__": f"{i:08d}", ext: data, "txt": caption, "json": json.dumps(row).encode()})
            counts[Path(sink.fname).name] += 1
    (out / COUNTS_FILE).write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
    return [out / name for name in sorted(counts)]
