"""File names read from a manifest (a data directory's ``pairs.json``, a trajectory cache's ``manifest.json``, a
checkpoint's or export's ``manifest.json``) are joined to their directory only when they stay inside it: the one rule
for that is ``inside_path``."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def inside_path(name: object) -> PurePosixPath | None:
    """``name`` as a relative POSIX path that stays inside its directory, or ``None`` for anything else (not a
    string, empty, absolute, with a ``..`` or empty part, or a backslash)."""
    if not isinstance(name, str) or not name or "\\" in name:
        return None
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts):
        return None
    return pure


def listed_file(root: str | Path, name: object, listed_in: str | Path) -> Path:
    """``root / name`` for a file ``name`` that the manifest ``listed_in`` lists.

    Raises:
        ValueError: ``name`` is not a non-empty relative path inside ``root`` (absolute, with a ``..`` part, a
            backslash or an empty part), naming the manifest; nothing is opened.
    """
    pure = inside_path(name)
    if pure is None:
        raise ValueError(
            f"{listed_in} lists the file {name!r}, which is not a relative path inside {root}: refusing to open it. "
            "The directory was edited or written by other software; write it again."
        )
    return Path(root) / pure
