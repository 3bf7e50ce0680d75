"""Manifests: every file hashed, any change, addition, removal or foreign fingerprint refused with the file named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fewstep.train.manifest import (
    MANIFEST,
    IntegrityError,
    fingerprint_differences,
    read_manifest,
    verify_manifest,
    weights_fingerprint,
    write_manifest,
)


@pytest.fixture
def written(tmp_path):
    (tmp_path / "trainable").mkdir()
    weights = {"a.weight": torch.randn(3, 4), "b": torch.zeros(2)}
    save_file(weights, tmp_path / "trainable" / "student.safetensors")
    (tmp_path / "state.json").write_text('{"step": 3}')
    fingerprint = weights_fingerprint({"student": weights}, family="unet2d")
    write_manifest(tmp_path, fingerprint, "checkpoint")
    return tmp_path, fingerprint


def test_a_written_directory_verifies(written):
    root, fingerprint = written
    manifest = verify_manifest(root, fingerprint)
    assert sorted(manifest["files"]) == ["state.json", "trainable/student.safetensors"]
    assert manifest["fingerprint"]["num_tensors"] == 2 and manifest["fingerprint"]["num_elements"] == 14


def test_one_flipped_bit_is_found(written):
    root, _ = written
    path = root / "trainable" / "student.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="student.safetensors does not match its sha256"):
        verify_manifest(root)


@pytest.mark.parametrize("change", ["remove", "add"])
def test_removed_or_added_files_are_found(written, change):
    root, _ = written
    if change == "remove":
        (root / "state.json").unlink()
        match = "state.json is listed .* but missing"
    else:
        (root / "trainable" / "planted.safetensors").write_bytes(b"x")
        match = "planted.safetensors is not listed"
    with pytest.raises(IntegrityError, match=match):
        verify_manifest(root)


def test_another_models_fingerprint_is_refused(written):
    root, _ = written
    other = weights_fingerprint({"student": {"a.weight": torch.randn(3, 5), "b": torch.zeros(2)}}, family="unet2d")
    with pytest.raises(IntegrityError, match="another model .*tensors"):
        verify_manifest(root, other)
    assert fingerprint_differences({"family": "sd3"}, {"family": "flux"}) == [
        "family: 'flux' in the file, 'sd3' expected"
    ]


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "a/../../b", "a\\..\\b", ""])
def test_paths_that_leave_the_directory_are_refused(written, bad):
    root, _ = written
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="leaves its directory"):
        read_manifest(root)


def test_missing_and_garbled_manifests(tmp_path):
    assert verify_manifest(tmp_path) is None
    with pytest.raises(IntegrityError, match="no manifest.json"):
        verify_manifest(tmp_path, required=True)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="cannot be read"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": 1, "files": []}')
    with pytest.raises(IntegrityError, match="not a fewstep manifest"):
        verify_manifest(tmp_path)
