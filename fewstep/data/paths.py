"""File names read from a data directory's own manifest (``pairs.json``, a trajectory cache's ``manifest.json``)
are joined to the directory only when they stay inside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def listed_file(root: str | Path, name: object, listed_in: str | Path) -> Path:
    """``root / name`` for a file ``name`` that the manifest ``listed_in`` lists.

    Raises:
        ValueError: ``name`` is not a non-empty relative path inside ``root`` (absolute, with a ``..`` part, a
            backslash or an empty part), naming the manifest; nothing is opened.
    """
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or not name or "\\" in name or pure.is_absolute() or any(p in ("..", "") for p in pure.parts):
        raise ValueError(
            f"{listed_in} lists the file {name!r}, which is not a relative path inside {root}: refusing to open it. "
            "The directory was edited or written by other software; write it again."
        )
    return Path(root) / pure
