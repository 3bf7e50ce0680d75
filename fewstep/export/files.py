"""Export directories are written whole or not at all, carry a manifest, and are verified before they are sampled.

``staged_directory(out)`` gives a fresh staging directory next to ``out`` (``.<name>.staging-<pid>-<token>``); when
the export inside it is complete (files written, ``manifest.json`` with the sha256 of each, everything synced), the
old ``out`` is renamed aside, the staging directory renamed into place and the old one deleted. An export that fails
half-way leaves ``out`` as it was; no file of an older export survives in a new one. A directory that is not an
export (no ``manifest.json`` or ``fewstep_student.json``) and not empty is never replaced.

``verify_export(dir)`` checks every file against the manifest (``fewstep.train.manifest.verify_manifest``) and the
manifest's weights fingerprint against the tensors in the export's safetensors files. ``fewstep eval`` writes its
reports into ``<export>/eval/`` by default; files there are not part of the export and are not checked.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fewstep.objectives.spec import SPEC_FILE
from fewstep.train.manifest import (
    MANIFEST,
    IntegrityError,
    fingerprint_differences,
    verify_manifest,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)

KIND = "export"
EVAL_DIR = "eval"  # fewstep eval's default output inside an export: not part of it
_TENSOR_KEYS = ("tensors", "num_tensors", "num_elements")


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``fewstep export`` (it has a manifest or a student file)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / SPEC_FILE).is_file()


def export_fingerprint(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """``weights_fingerprint`` of every tensor (name and shape) in the ``*.safetensors`` files under ``directory``,
    grouped by file (relative path), plus ``fields``. Reads the files' headers only."""
    from safetensors import safe_open

    root = Path(directory)
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(f"{EVAL_DIR}/"):
            continue
        with safe_open(str(path), "pt") as f:
            groups[rel] = {name: SimpleNamespace(shape=f.get_slice(name).get_shape()) for name in f.keys()}
    return weights_fingerprint(groups, **fields)


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Write an export into the yielded staging directory; on success it replaces ``target`` in one rename.

    Raises:
        FileExistsError: ``target`` is a file.
        ValueError: ``target`` is a non-empty directory that is not an export (it is left alone).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"{target} is a file; an export is a directory. Give --out / out_dir a new or existing export directory."
        )
    if target.is_dir() and any(target.iterdir()) and not is_export(target):
        raise ValueError(
            f"{target} is not empty and is not a fewstep export (no {MANIFEST} or {SPEC_FILE}): refusing to replace "
            "it. Give a new directory, an empty one, or an earlier export to overwrite."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    staging = target.parent / f".{target.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        aside = target.parent / f".{target.name}.replaced-{secrets.token_hex(4)}"
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, target)
    _fsync_dir(target.parent)


def _sweep(target: Path) -> None:
    """Remove what an interrupted export left next to ``target``: staging directories of processes that are gone,
    and old exports renamed aside (put back first if the new one never arrived)."""
    aside = sorted(target.parent.glob(f".{target.name}.replaced-*"))
    if aside and not target.exists():
        os.rename(aside.pop(), target)
    for path in aside:
        shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f".{target.name}.staging-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_export(directory: str | Path) -> dict[str, Any] | None:
    """Check an export against its ``manifest.json``: every file's sha256, no file added (outside ``eval/``), the
    weights fingerprint equal to the tensors in its safetensors files.

    Returns:
        The manifest; ``None`` (with a warning) for an export written before exports had manifests.

    Raises:
        IntegrityError: naming the file that differs, or the manifest that is not an export's.
    """
    root = Path(directory)
    outputs = root / EVAL_DIR
    ignore = [p.relative_to(root).as_posix() for p in outputs.rglob("*") if p.is_file()] if outputs.is_dir() else []
    try:
        manifest = verify_manifest(root, ignore=ignore)
    except RecursionError:
        message = f"{root / MANIFEST} is nested too deeply to be a manifest: export the run again."
        raise IntegrityError(message) from None
    if manifest is None:
        logger.warning(
            "%s has no %s (written by an older fewstep): its files cannot be verified. Export the run again to add "
            "one.",
            root,
            MANIFEST,
        )
        return None
    if manifest.get("kind") != KIND:
        raise IntegrityError(
            f"{root / MANIFEST} describes a {manifest.get('kind')!r} directory, not an export: pass an export "
            "directory written by `fewstep export`."
        )
    found = export_fingerprint(root)
    recorded = manifest["fingerprint"]
    differences = fingerprint_differences(
        {k: found[k] for k in _TENSOR_KEYS}, {k: recorded.get(k) for k in _TENSOR_KEYS}
    )
    if differences:
        raise IntegrityError(
            f"{root / MANIFEST} records other weights than the export's safetensors files hold "
            f"({'; '.join(differences)}): the manifest was edited. Export the run again."
        )
    return manifest
