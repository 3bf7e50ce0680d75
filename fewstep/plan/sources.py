"""Where the planner finds a teacher's configs without loading (or downloading) a single weight.

``config_directory(pretrained)`` returns a directory laid out like a diffusers pipeline (``model_index.json`` and one
folder per component with its ``config.json``), looked up in this order:

1. ``tiny:<family>`` and ``fewstep:<asset>``: the tiny zoo and the packaged teachers (``resolve_pretrained``);
2. a local directory (one written by ``save_pretrained``);
3. the architecture configs shipped with fewstep for well-known Hub models (``fewstep/assets/configs``: only the
   component configs, written from the public model cards' numbers; no weights), by Hub id;
4. the local Hugging Face cache (``huggingface_hub``, offline: nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

from fewstep.assets import ASSETS_DIR
from fewstep.models.loading import resolve_pretrained

SHIPPED_CONFIGS = ASSETS_DIR / "configs"
INDEX = "model_index.json"


def shipped_models() -> list[str]:
    """The Hub ids whose configs ship with fewstep (``org/name``)."""
    if not SHIPPED_CONFIGS.is_dir():
        return []
    return sorted(p.name.replace("--", "/", 1) for p in SHIPPED_CONFIGS.iterdir() if (p / INDEX).is_file())


def shipped_config_directory(hub_id: str) -> Path | None:
    """The shipped config directory of ``hub_id`` (matched without regard to case), or None."""
    wanted = hub_id.strip().strip("/").lower()
    for name in shipped_models():
        if name.lower() == wanted:
            return SHIPPED_CONFIGS / name.replace("/", "--", 1)
    return None


def cached_config_directory(hub_id: str, revision: str | None = None) -> Path | None:
    """The snapshot of ``hub_id`` in the local Hugging Face cache when it holds the pipeline's ``model_index.json``;
    None otherwise (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub_id, revision=revision, local_files_only=True, allow_patterns=["*.json"]))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return path if (path / INDEX).is_file() else None


def config_directory(pretrained: str, revision: str | None = None) -> tuple[Path, str]:
    """The directory of configs for ``teacher.pretrained`` and where it came from (``local``, ``shipped``, ``cache``).

    Raises:
        FileNotFoundError: no configs for ``pretrained`` on this machine; the message lists what would work.
    """
    spec = resolve_pretrained(pretrained)
    path = Path(spec)
    if path.is_dir():
        if not (path / INDEX).is_file():
            raise FileNotFoundError(
                f"{spec!r} has no {INDEX}, so it is not a diffusers pipeline directory; `fewstep plan` reads the "
                "component configs of a whole pipeline saved with `pipe.save_pretrained(dir)`."
            )
        return path, "local"
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.replace("/", "", 1)
    if looks_local:
        raise FileNotFoundError(
            f"Teacher directory {spec!r} does not exist. Create it first (e.g. the run or export that writes it), "
            "or point teacher.pretrained at an existing pipeline directory or a Hub id."
        )
    shipped = shipped_config_directory(spec)
    if shipped is not None:
        return shipped, "shipped"
    cached = cached_config_directory(spec, revision)
    if cached is not None:
        return cached, "cache"
    raise FileNotFoundError(
        f"No configs for teacher {pretrained!r} on this machine: it is not a local pipeline directory, not one of "
        f"the models whose configs ship with fewstep ({', '.join(shipped_models())}), and not in the local Hugging "
        "Face cache. `fewstep plan` never downloads: fetch the configs once (`huggingface-cli download "
        f"{pretrained} --include '*.json'`) or pass a local pipeline directory."
    )
