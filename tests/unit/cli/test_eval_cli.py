"""``fewstep eval``: a teacher and a training run end to end, and user mistakes as one ``error:`` line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.cli.main import main
from fewstep.config import load_recipe
from fewstep.train.loop import train
from tests.helpers import fresh_accelerate_state, single_thread  # noqa: F401 (fixtures)


def test_eval_of_a_teacher_prints_the_table_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "teacher_eval"
    rc = main(["eval", "fewstep:digits-flow", "--steps", "2,4", "--num-samples", "20", "--batch-size", "10",
               "--guidance", "1.5", "--seed", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert ("| model | steps | NFE | fid ↓ | accuracy ↑ | precision ↑ | recall ↑ | diversity ↑ | diversity_ratio ↑ "
            "| ms / image | peak MiB |") in printed  # fmt: skip
    assert "| teacher (Euler, w=1.5) | 4 | 8 |" in printed and str(out / "eval.md") in printed
    report = json.loads((out / "eval.json").read_text())
    assert [(r["num_steps"], r["nfe_per_image"]) for r in report["rows"]] == [(2, 4), (4, 8)]
    assert report["target"] == {"kind": "teacher", "spec": "fewstep:digits-flow"} and report["seed"] == 1
    model = report["models"]["teacher (Euler, w=1.5)"]
    assert model["guidance_source"] == "given (--guidance)" and model["schedule"] == "flow"
    assert "FlowMatchEulerDiscreteScheduler" in model["scheduler"]  # the pipeline's own scheduler grid
    assert len(list((out / "images" / "teacher_euler_w_1.5_4steps").glob("*.png"))) == 20
    # diversity per class (2 seeds each), as a ratio to the teacher at its most steps; no student, nothing flagged
    assert report["diversity_check"]["reference"]["num_steps"] == 4 and report["diversity_check"]["flagged"] == []
    assert [r["metrics"]["diversity_ratio"] for r in report["rows"]][1] == 1.0


def test_eval_of_a_run_defaults_to_its_eval_folder(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["train.max_steps=1", "train.sample_every=null", "train.progress=false", "data.batch_size=4",
                 "optim.warmup_steps=0", f"output_dir={run}"]  # fmt: skip
    train(load_recipe("quickstart/digits_lcm", overrides))
    rc = main(["eval", str(run), "--steps", "1", "--teacher-steps", "2", "--num-samples", "10", "--no-images",
               "--metrics", "accuracy"])  # fmt: skip
    assert rc == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert [(r["model"], r["nfe_per_image"]) for r in report["rows"]] == [
        ("student (lcm, raw)", 1), ("teacher (DDIM, w=2)", 4)]  # fmt: skip
    assert list(report["metrics"]) == ["accuracy"] and not (run / "eval" / "images").exists()
    assert (run / "eval" / "grid.png").is_file()
    assert "error" not in capsys.readouterr().err

    assert main(["eval", str(run), "--checkpoint", "best", "--num-samples", "2"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/run"], "Evaluation target '/no/such/run' does not exist"),
        (["fewstep:digits-vp", "--metrics", "fdi"], "Unknown metric 'fdi'. Did you mean 'fid'?"),
        (["fewstep:digits-vp", "--metrics", "clip", "--steps", "1"], "`clip` (CLIP score) needs a text-conditioned"),
        (["fewstep:digits-vp", "--num-samples", "0"], "--num-samples must be >= 1"),
        (["fewstep:digits-vp", "--prompts", "/no/prompts.txt"], "--prompts '/no/prompts.txt': no such file"),
        (["fewstep:nope"], "Unknown fewstep asset 'nope'"),
    ],
)
def test_user_mistakes_exit_2_with_one_error_line(args, message, capsys):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err  # may start with diffusers' "Loading pipeline components" bar
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_bad_step_lists_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "fewstep:digits-vp", "--steps", "0,x"])
    assert exit_info.value.code == 2 and "expected comma-separated positive step counts" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (2 layers, width 32, 32×32 images) with its processor, saved offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from fewstep.testing.tokenizer import clip_tokenizer

    try:  # transformers 5 without torchvision: the PIL image processor
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(directory)
    processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def test_clip_score_of_a_text_teacher_with_local_weights(tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "sd15"
    rc = main(["eval", "tiny:sd15", "--steps", "2", "--num-samples", "4", "--batch-size", "2", "--metrics", "clip",
               "--clip", str(tiny_clip), "--prompts", str(prompts), "--out", str(out), "--no-images"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    (row,) = report["rows"]
    assert row["nfe_per_image"] == 4  # SD1.5's default w = 7.5: CFG doubles each of the 2 steps
    assert 0 <= row["metrics"]["clip_score"] <= 100 and report["metrics"]["clip_score"]["higher_is_better"] is True
    assert report["inputs"]["prompts"] == ["a red circle", "a blue square"]
    assert report["models"]["teacher (DDIM, w=7.5)"]["scheduler"] == "DDIM (η=0) on DDIMScheduler's timesteps"
    assert "| teacher (DDIM, w=7.5) | 2 | 4 |" in capsys.readouterr().out

    assert main(["eval", "tiny:sd15", "--steps", "1", "--num-samples", "1", "--metrics", "clip",
                 "--clip", str(tmp_path / "no_clip")]) == 2  # fmt: skip
    assert "CLIP" in capsys.readouterr().err
