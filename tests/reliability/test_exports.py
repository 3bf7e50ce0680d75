"""Exports are written whole or not at all, carry a manifest that eval checks before it loads anything, and their
``fewstep_student.json`` is read through a schema that names the bad key; only allow-listed diffusers schedulers are
ever instantiated from it."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

import fewstep.export.run as export_module
from fewstep.cli.main import main
from fewstep.eval.exported import load_export
from fewstep.export import export_run, read_schedule
from fewstep.export.files import verify_export
from fewstep.objectives.spec import SamplingSpec
from fewstep.train.manifest import MANIFEST, IntegrityError, read_manifest, sha256_file, write_manifest
from tests.helpers import TINY_LCM_RECIPE, fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

RECIPE = TINY_LCM_RECIPE
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
EVAL = ["--steps", "1", "--no-teacher", "--num-samples", "2", "--batch-size", "2", "--no-images", "--metrics",
        "accuracy", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-step digits LCM run (a full UNet2D student) with its checkpoint."""
    root = tmp_path_factory.mktemp("run")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.replace("OUT", str(root / "run")))
    assert main(["train", str(recipe)]) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    return export_run(run, tmp_path_factory.mktemp("export") / "export")


@pytest.fixture
def export(exported, tmp_path) -> Path:
    """A fresh copy of the export for one test to damage."""
    return Path(shutil.copytree(exported, tmp_path / "export"))


def tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def eval_export(capsys, export: Path) -> tuple[int, str]:
    code = main(["eval", str(export), "--out", str(export.parent / "eval_out"), *EVAL])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- manifest


def test_an_export_lists_every_file_with_its_sha256_and_the_weights_fingerprint(export):
    """Exports had no integrity record at all: a flipped bit was exported, evaluated and reported with exit 0."""
    manifest = read_manifest(export)
    assert manifest["kind"] == "export"
    files = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    assert files == {rel: sha for rel, sha in tree(export).items() if rel != MANIFEST}
    assert {"fewstep_student.json", "README.md", "model_index.json", WEIGHTS} <= set(files)
    fingerprint = manifest["fingerprint"]
    assert (fingerprint["family"], fingerprint["objective"], fingerprint["layout"]) == ("unet2d", "lcm", "merged")
    assert fingerprint["num_tensors"] > 0 and fingerprint["num_elements"] > 100_000
    assert verify_export(export) == manifest


def test_a_flipped_bit_in_the_exported_weights_is_refused_naming_the_file(export, capsys):
    """One flipped bit in the exported UNet gave exit 0 and a silently wrong accuracy (1.0 -> 0.125)."""
    code, err = eval_export(capsys, export)
    assert code == 0, err
    data = bytearray((export / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor data, not the header
    (export / WEIGHTS).write_bytes(bytes(data))
    code, err = eval_export(capsys, export)
    assert code == 2
    one_error(err, str(export / WEIGHTS), "does not match its sha256", "Export the run again")


def test_a_leftover_lora_file_is_refused_not_preferred(export, capsys):
    """A stale pytorch_lora_weights.safetensors left in an export directory was loaded in place of its pipeline."""
    shutil.copy(export / WEIGHTS, export / "pytorch_lora_weights.safetensors")
    code, err = eval_export(capsys, export)
    assert code == 2
    one_error(err, "pytorch_lora_weights.safetensors is not listed in", "Remove it")


def test_an_export_without_a_manifest_still_loads_with_a_warning(export, caplog):
    """Exports written before manifests existed keep working; the user is told they are unverified."""
    (export / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="fewstep.export.files"):
        loaded = load_export(export, steps=[1], device="cpu")
    assert loaded.spec.objective == "lcm"
    assert "has no manifest.json" in caplog.text and "cannot be verified" in caplog.text


# ------------------------------------------------------------------------------------------------------ atomicity


def test_exporting_again_replaces_the_old_export_whole(run, export, capsys):
    """Exporting into a used directory kept the old files (a stale LoRA there was then preferred by eval)."""
    (export / "pytorch_lora_weights.safetensors").write_bytes(b"stale")
    (export / "eval").mkdir()
    (export / "eval" / "eval.json").write_text("{}")
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert not (export / "pytorch_lora_weights.safetensors").exists() and not (export / "eval").exists()
    verify_export(export)
    assert not [p.name for p in export.parent.iterdir() if p.name.startswith(".export.")]  # no staging left over
    code, err = eval_export(capsys, export)
    assert code == 0, err


def test_a_failed_export_leaves_the_previous_one_untouched(run, export, monkeypatch):
    """Exports were written in place: a failure half-way left a mix of old and new files."""
    before = tree(export)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(export / "README.md"))

    monkeypatch.setattr(export_module, "write_card", disk_full)  # the last file of an export
    with pytest.raises(OSError, match="No space left"):
        export_run(run, export)
    assert tree(export) == before
    verify_export(export)
    assert not [p.name for p in export.parent.iterdir() if p.name.startswith(".export.")]


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(run, tmp_path, capsys):
    """`--out` naming a directory of other files (a typo, `--out .`) must never delete them."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(out)]) == 2
    one_error(capsys.readouterr().err, str(out), "is not a fewstep export", "refusing to replace it")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("keep me")
    assert main(["export", str(run), "--out", str(tmp_path / "afile")]) == 2
    one_error(capsys.readouterr().err, "afile is a file; an export is a directory")
    assert (tmp_path / "afile").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- fewstep_student.json


def _edit_student_file(export: Path, edit) -> None:
    """Change fewstep_student.json and write a matching manifest, as other software could: the schema, not the
    hash, must catch it."""
    path = export / "fewstep_student.json"
    text = edit(json.loads(path.read_text())) if callable(edit) else edit
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    write_manifest(export, read_manifest(export)["fingerprint"], "export")


def _without(key):
    def edit(data):
        del data[key]
        return data

    return edit


def _with(key, value):
    def edit(data):
        data[key] = value
        return data

    return edit


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ("{not json", ["is not valid JSON (JSONDecodeError"]),
        ("[" * 100_000 + "]" * 100_000, ["is not valid JSON (RecursionError"]),
        (_without("scheduler_class"), ["scheduler_class: Field required"]),
        (_with("steps", "1,2,4"), ["steps: Input should be a valid dictionary; got '1,2,4'"]),
        (_with("steps", {"1": {"timesteps": "999"}}), ["steps.1.timesteps: Input should be a valid list"]),
        (_with("scheduler_class", "DiffusionPipeline"), ["scheduler_class: Input should be 'DDIMScheduler'"]),
        (_with("extra_call_kwargs", {"num_images_per_prompt": 10**9}), ["extra_call_kwargs.num_images_per_prompt"]),
        (_with("guidance_scale", float("nan")), ["guidance_scale: ", "got nan"]),
        (_with("steps", {"1": {"sigmas": [float("inf")]}}), ["steps.1.sigmas.0: should be a finite number"]),
        (_with("recommended_steps", "4"), ["recommended_steps: Input should be a valid integer"]),
    ],
)
def test_a_bad_student_file_is_one_error_naming_the_key(export, capsys, edit, needles):
    """KeyError / TypeError / AttributeError tracebacks came out of fewstep_student.json, and any diffusers class
    name in it was looked up and instantiated."""
    _edit_student_file(export, edit)
    code, err = eval_export(capsys, export)
    assert code == 2
    one_error(err, str(export / "fewstep_student.json"), *needles)


def test_only_allow_listed_scheduler_classes_are_ever_looked_up(export):
    spec = read_schedule(export)
    spec.scheduler_class = "DiffusionPipeline"  # a diffusers class, not a scheduler
    with pytest.raises(ValueError, match="'DiffusionPipeline' is not one fewstep exports; allowed: DDIMScheduler"):
        spec.scheduler()
    with pytest.raises(ValueError, match="scheduler_class"):
        SamplingSpec.from_json({**read_schedule(export).to_json(), "scheduler_class": "os.system"})


def test_a_manifest_whose_fingerprint_was_edited_is_refused(export):
    """The manifest's weights fingerprint is checked against the tensors actually in the export's safetensors files."""
    manifest = read_manifest(export)
    write_manifest(export, {**manifest["fingerprint"], "num_tensors": 1}, "export")
    with pytest.raises(IntegrityError, match="records other weights than the export's safetensors files hold"):
        verify_export(export)
    write_manifest(export, manifest["fingerprint"], "checkpoint")
    with pytest.raises(IntegrityError, match="describes a 'checkpoint' directory, not an export"):
        load_export(export, steps=[1], device="cpu")


def test_a_deeply_nested_manifest_is_refused_naming_it(export, capsys):
    (export / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    code, err = eval_export(capsys, export)
    assert code == 2
    one_error(err, str(export / MANIFEST), "nested too deeply")
