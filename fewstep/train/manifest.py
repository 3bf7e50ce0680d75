"""Manifests: the sha256 of every file in a checkpoint or export directory, and a fingerprint of the model it holds.

``manifest.json`` sits at the top of the directory::

    {
      "format": 1,
      "kind": "checkpoint",                     # or "export"
      "files": {"trainable/student.safetensors": {"sha256": "…", "bytes": 123}, …},
      "fingerprint": {"family": "unet2d", "tensors": "<sha256 of names and shapes>", "num_tensors": 8, …}
    }

``verify_manifest`` re-hashes every listed file and refuses a directory whose files were changed, truncated, removed
or added after it was written (an added file could be picked up by a loader that lists a folder), and one whose
fingerprint differs from the model about to receive its weights. Paths stay inside the directory: a manifest that
names ``../x`` or an absolute path is refused before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from fewstep.data.paths import inside_path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


class IntegrityError(RuntimeError):
    """A checkpoint or export does not match its manifest; the message names the file and the fix."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(groups: Mapping[str, Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """What a set of weights is, independent of its values: a hash of every ``group/name`` with its shape, the
    tensor and element counts, and ``fields`` (e.g. ``family``, ``objective``).

    Args:
        groups: ``{group: {name: tensor}}`` (anything with a ``.shape``).
        fields: extra JSON values recorded as they are and compared exactly.
    """
    lines, elements = [], 0
    for group in sorted(groups):
        for name in sorted(groups[group]):
            shape = [int(d) for d in groups[group][name].shape]
            lines.append(f"{group}/{name}:{shape}")
            n = 1
            for d in shape:
                n *= d
            elements += n
    tensors = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {**fields, "tensors": tensors, "num_tensors": len(lines), "num_elements": elements}


def fingerprint_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``"<key>: <found> here, <expected> expected"`` for every key whose values differ (a missing key counts)."""
    keys = sorted(set(expected) | set(found))
    return [
        f"{key}: {found.get(key)!r} in the file, {expected.get(key)!r} expected"
        for key in keys
        if expected.get(key) != found.get(key)
    ]


def write_manifest(
    directory: str | Path, fingerprint: Mapping[str, Any], kind: str, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """Hash every regular file under ``directory`` (except the manifest and the relative paths in ``exclude``) and
    write ``manifest.json`` next to them (to a temporary name first, then renamed). Returns the manifest."""
    root = Path(directory)
    skipped = {MANIFEST, *exclude}
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skipped:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "kind": kind, "files": files, "fingerprint": dict(fingerprint)}
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of ``directory`` (``None`` when there is none), its structure and paths
    checked."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path} cannot be read ({type(err).__name__}: {err}): the manifest is corrupt.") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(files, dict)
        or not isinstance(manifest.get("fingerprint"), dict)
        or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())
    ):
        raise IntegrityError(
            f"{path} is not a fewstep manifest of format {FORMAT} (expected the keys format, kind, files with a sha256 "
            "per file, fingerprint): the directory was changed or written by other software."
        )
    for rel in files:
        safe_relative_path(rel, path)
    return manifest


def safe_relative_path(rel: str, where: str | Path) -> PurePosixPath:
    """``rel`` as a relative POSIX path that stays inside its directory; ``IntegrityError`` naming ``where`` for an
    absolute path, a ``..`` part, a backslash or an empty name."""
    pure = inside_path(rel)
    if pure is None:
        raise IntegrityError(
            f"{where} names the path {rel!r}, which leaves its directory: refusing to open it. Paths in a manifest "
            "must be relative and inside the directory."
        )
    return pure


def verify_manifest(
    directory: str | Path,
    expected_fingerprint: Mapping[str, Any] | None = None,
    *,
    ignore: Iterable[str] = (),
    required: bool = False,
) -> dict[str, Any] | None:
    """Check ``directory`` against its ``manifest.json``: every listed file present with its sha256, no unlisted
    file (except the relative paths in ``ignore``), and the fingerprint equal to ``expected_fingerprint`` on the
    keys it gives.

    Returns:
        The manifest, or ``None`` when the directory has none and ``required`` is False (written before manifests
        existed: the caller decides whether to warn).

    Raises:
        IntegrityError: naming the first file that differs, or the fingerprint keys that differ.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    if manifest is None:
        if required:
            raise IntegrityError(f"{root} has no {MANIFEST}: it cannot be verified. Write it again with fewstep.")
        return None
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in {root / MANIFEST} but missing: {_fix(manifest)}")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size) or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(
                f"{path} does not match its sha256 in {root / MANIFEST}: the file is corrupt or was changed after it "
                f"was written. {_fix(manifest)}"
            )
    skipped = {MANIFEST, *ignore}
    extra = sorted(
        rel
        for rel in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if rel not in manifest["files"] and rel not in skipped and not rel.startswith(f".{MANIFEST}")
    )
    if extra:
        raise IntegrityError(
            f"{root / extra[0]} is not listed in {root / MANIFEST} (unlisted files: {extra[:5]}): something was added "
            f"after the directory was written. Remove it. {_fix(manifest)}"
        )
    if expected_fingerprint is not None:
        found = {key: manifest["fingerprint"].get(key) for key in expected_fingerprint}
        differences = fingerprint_differences(dict(expected_fingerprint), found)
        if differences:
            raise IntegrityError(
                f"{root} holds weights of another model ({'; '.join(differences)}). Use the recipe or model it was "
                "written for."
            )
    return manifest


def _fix(manifest: Mapping[str, Any]) -> str:
    if manifest.get("kind") == "checkpoint":
        return "Delete this checkpoint (train.resume=auto then continues from the previous one) or start over."
    return "Export the run again."
