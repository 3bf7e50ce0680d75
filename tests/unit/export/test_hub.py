"""``fewstep export RUN --out DIR --push-to-hub REPO_ID``: the verified export is what is uploaded, its model card
carries the run's eval table of the exported weights, the real base model path, scheduler, steps and guidance; without
the Hub the export stays intact and the error says how to push it later; the card's snippet runs as pasted.

There is no network here: the two ``huggingface_hub.HfApi`` calls that reach the Hub (``create_repo``,
``upload_folder``) are replaced by recorders; everything before them is the real code path."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from fewstep.assets import asset_path
from fewstep.cli.main import main
from fewstep.config.load import load_recipe
from fewstep.eval.report import format_table, read_report
from fewstep.export import WEIGHT_NAME
from fewstep.export.files import verify_export
from fewstep.testing import tiny_path
from fewstep.train.loop import train
from fewstep.train.manifest import MANIFEST, read_manifest
from tests.helpers import TINY_LCM_RECIPE, captioned_noise_images, fresh_accelerate_state, one_error, single_thread  # noqa: F401 (fixtures)

REPO = "alice/tiny-lcm-lora"
EVAL = ["--no-teacher", "--num-samples", "2", "--batch-size", "2", "--no-images", "--device", "cpu"]


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory) -> Path:
    """The SD1.5 LCM-LoRA recipe on tiny:sd15, 2 steps (a checkpoint each), evaluated at both checkpoints."""
    images = captioned_noise_images(tmp_path_factory.mktemp("images"))
    run = tmp_path_factory.mktemp("sd15") / "run"
    overrides = [
        "teacher.pretrained=tiny:sd15", f"data.path={images}", "data.resolution=16", "data.batch_size=2",
        "data.num_workers=0", "student.lora.rank=4", "student.gradient_checkpointing=false", "optim.warmup_steps=0",
        "optim.lr_scheduler=constant", "optim.lr=1e-2", "train.max_steps=2", "train.checkpoint_every=1",
        "train.sample_every=null", "train.mixed_precision=no", "train.progress=false", f"output_dir={run}",
    ]  # fmt: skip
    train(load_recipe("lcm/sd15_lcm_lora", overrides))
    assert main(["eval", str(run), "--steps", "1,2", *EVAL]) == 0  # the newest checkpoint: run/eval/eval.json
    older = run / "checkpoints" / "step_00000001"
    assert main(["eval", str(run), "--checkpoint", str(older), "--steps", "1", "--out", str(run / "eval" / "old"),
                 *EVAL]) == 0  # fmt: skip
    return run


@pytest.fixture
def hub(monkeypatch) -> list[tuple]:
    """Record ``HfApi.create_repo`` / ``upload_folder`` (the calls that would reach the Hub) with the api's token."""
    calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def uploaded_files(folder: Path, kwargs: dict) -> set[str]:
    """The files ``upload_folder`` would send, by huggingface_hub's own pattern filter."""
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(filter_repo_objects(paths, allow_patterns=kwargs["allow_patterns"]))


def test_push_uploads_the_verified_export_with_a_card_for_the_hub(sd15_run, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEWSTEP_TEST_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "export"
    assert main(["export", str(sd15_run), "--out", str(out), "--push-to-hub", REPO, "--private",
                 "--hub-token-env", "FEWSTEP_TEST_TOKEN"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert f"pushed {out} to https://huggingface.co/{REPO}" in printed.out
    assert "hf_not_a_real_token" not in printed.out + printed.err

    (create, token, repo, kwargs), (upload, token2, repo2, upload_kwargs) = hub
    assert (create, repo, token, kwargs) == ("create_repo", REPO, "hf_not_a_real_token",
                                             {"repo_type": "model", "private": True, "exist_ok": True})  # fmt: skip
    assert (upload, repo2, token2) == ("upload_folder", REPO, "hf_not_a_real_token")
    assert upload_kwargs["folder_path"] == str(out) and upload_kwargs["delete_patterns"] == "*"
    manifest = verify_export(out)  # what was uploaded is the intact export, every file of it and nothing else
    assert uploaded_files(out, upload_kwargs) == {*manifest["files"], MANIFEST}
    assert {WEIGHT_NAME, "README.md", "fewstep_student.json", "scheduler/scheduler_config.json"} <= set(
        manifest["files"]
    )
    assert manifest["fingerprint"]["hub_id"] == REPO

    card = (out / "README.md").read_text()
    base = str(tiny_path("sd15").resolve())  # tiny:sd15 written as the real directory
    table = format_table(read_report(sd15_run / "eval" / "eval.json")).rstrip("\n")
    assert table in card and "| student (lcm, raw) | 2 | 2 |" in card  # the run's eval table of these weights
    assert "training step 2, raw weights" in card
    assert "| student (lcm, raw) | 1 | 1 |" in card and card.count("| student (lcm, raw) |") == 2  # not step 1's
    assert f"* base model: `{base}`" in card and f'StableDiffusionPipeline.from_pretrained("{base}")' in card
    assert "tiny:" not in card
    assert "* scheduler: `LCMScheduler`" in card and "* steps: **4**" in card and "* guidance_scale: **1.0**" in card
    assert f'pipe.load_lora_weights("{REPO}", weight_name="{WEIGHT_NAME}")' in card  # loads from the Hub repo
    header = ModelCard(card).data
    assert header.base_model is None and header.library_name == "diffusers"  # a local path is no Hub base_model

    (out / "eval").mkdir()  # `fewstep eval DIR` writes here: not part of the export, not uploaded
    (out / "eval" / "eval.json").write_text("{}")
    assert main(["export", str(out), "--push-to-hub", REPO]) == 0  # an existing export: pushed as it is
    assert uploaded_files(out, hub[-1][3]) == {*manifest["files"], MANIFEST} and hub[-1][1] is None

    assert main(["export", str(out), "--push-to-hub", "bob/other"]) == 2  # its card loads from REPO
    one_error(capsys.readouterr().err, f"was exported for the Hub repository {REPO}", "--push-to-hub bob/other")
    assert len(hub) == 4


def test_without_the_hub_the_export_stays_intact_and_the_error_says_how_to_push(sd15_run, tmp_path, monkeypatch,
                                                                                 capsys):  # fmt: skip
    out = tmp_path / "export"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub loads
    assert main(["export", str(sd15_run), "--out", str(out), "--push-to-hub", REPO]) == 2
    later = f"fewstep export {out} --push-to-hub {REPO}"
    one_error(capsys.readouterr().err, "HF_HUB_OFFLINE=1", f"The export is intact at {out}", later)
    assert verify_export(out)["fingerprint"]["hub_id"] == REPO

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, but no network: nothing listens
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert main(["export", str(out), "--push-to-hub", REPO]) == 2
    one_error(capsys.readouterr().err, "ConnectError", f"The export is intact at {out}", later)
    assert verify_export(out) is not None

    assert main(["export", str(sd15_run), "--out", str(tmp_path / "x"), "--push-to-hub", REPO,
                 "--hub-token-env", "FEWSTEP_NO_SUCH_VARIABLE"]) == 2  # fmt: skip
    one_error(capsys.readouterr().err, "FEWSTEP_NO_SUCH_VARIABLE is not set")
    assert not (tmp_path / "x").exists()  # checked before exporting
    assert main(["export", str(sd15_run), "--out", str(tmp_path / "x"), "--push-to-hub", "no-owner"]) == 2
    one_error(capsys.readouterr().err, "owner/name")


def test_the_card_snippet_runs_as_pasted_for_a_tiny_sd15_export(sd15_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(sd15_run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'load_lora_weights("{out.resolve()}"' in code and str(tiny_path("sd15").resolve()) in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the snippet as a user would paste it
    pixels = np.asarray(scope["image"])
    assert scope["image"].size[0] > 0 and pixels.std() > 0


def test_the_card_snippet_runs_for_a_class_conditional_pixel_export(tmp_path):
    """fewstep:digits-vp exports a DDPMPipeline, which cannot pass class labels: the card writes the loop out. The run
    evaluates itself during training (FID and accuracy of the digits benchmark), and the card carries that table."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_LCM_RECIPE.replace("OUT", str(tmp_path / "run")))
    assert main(["train", str(recipe), "eval.every_steps=1", "eval.steps=[1,2]", "eval.num_samples=20"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"* base model: `{asset_path('digits-vp').resolve()}`" in card  # fewstep:digits-vp as its directory
    periodic = read_report(tmp_path / "run" / "eval" / "step_00000001" / "eval.json")
    assert "the periodic evaluation during training" in card and format_table(periodic).rstrip() in card
    assert {"fid", "accuracy"} <= set(periodic.rows[0].metrics)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "DDPMPipeline.from_pretrained" in code and "class_labels=labels" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all() and images.std() > 0
    assert read_manifest(out)["fingerprint"]["base_model"] == "fewstep:digits-vp"
