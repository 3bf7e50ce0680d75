"""``fewstep plan`` from the command line: the report, ``--json``, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from fewstep.cli.main import main
from fewstep.cli.plan import memory_size
from tests.helpers import one_error


def test_json_report_of_a_tiny_recipe(tmp_path, capsys):
    status = main(["plan", "quickstart/digits_lcm", "--gpus", "2", "--gpu-memory", "24GB", "--json",
                   f"output_dir={tmp_path}"])  # fmt: skip
    assert status == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 2 and plan["gpu_memory_bytes"] == 24 * 2**30
    layouts = {row["layout"]: row for row in plan["layouts"]}
    assert {"ddp", "fsdp2_full_shard", "fsdp2_shard_grad_op+offload+ckpt"} <= set(layouts)
    assert plan["recommended"] == "ddp"  # a 0.7 M-parameter UNet fits anywhere, replicated
    assert plan["launch"].startswith("accelerate launch --num_processes 2 --multi_gpu -m fewstep train")
    assert layouts["fsdp2_full_shard"]["persistent"]["AdamW state"] < layouts["ddp"]["persistent"]["AdamW state"]


def test_text_report_recommends_a_layout(capsys):
    assert main(["plan", "dmd/sd15_dmd2", "teacher.pretrained=tiny:sd15", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| layout | static GiB | activations GiB |" in out
    assert "recommended: ddp" in out and "accelerate launch --num_processes 8 --multi_gpu" in out


def test_nothing_fits_says_what_to_change(capsys):
    assert main(["plan", "dmd/sd15_dmd2", "teacher.pretrained=tiny:sd15", "--gpu-memory", "1MiB"]) == 0
    assert "No layout fits" in capsys.readouterr().out


def test_unknown_recipe_is_one_line(capsys):
    assert main(["plan", "no/such_recipe"]) == 2
    one_error(capsys.readouterr().err, "no/such_recipe", "not found")


def test_teacher_without_configs_offline_is_one_line(capsys):
    status = main(["plan", "dmd/sd15_dmd2", "teacher.pretrained=someone/not-a-cached-model"])
    assert status == 2
    one_error(capsys.readouterr().err, "someone/not-a-cached-model", "never downloads")


def test_bad_memory_size_is_refused():
    assert memory_size("80GB") == memory_size("80GiB") == 80 * 2**30
    assert memory_size("81920MiB") == 80 * 2**30
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "dmd/sd15_dmd2", "--gpu-memory", "lots"])
    assert exit_info.value.code == 2


def test_missing_teacher_directory_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no" / "export"
    assert main(["plan", "dmd/sd15_dmd2", f"teacher.pretrained={missing}"]) == 2
    one_error(capsys.readouterr().err, str(missing), "does not exist")
