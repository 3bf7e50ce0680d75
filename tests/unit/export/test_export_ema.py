"""``fewstep export`` of a run trained with EMA writes the weights ``fewstep eval`` samples: a stock diffusers pipeline
loaded from the default export reproduces the run target's student (EMA weights) to 1e-5; a ``weights="raw"`` export
does not. The export records which checkpoint and weights it took."""

from __future__ import annotations

import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.config import load_recipe
from fewstep.eval.harness import shared_noise
from fewstep.eval.targets import run_target
from fewstep.export import WEIGHT_NAME, export_run, read_schedule, read_source
from fewstep.testing import tiny_path
from fewstep.train.loop import train
from fewstep.train.manifest import read_manifest, write_manifest
from fewstep.train.run import load_run
from tests.helpers import captioned_noise_images

PROMPTS = ["a red circle", "a blue square"]
STEPS = (1, 2)
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """The SD1.5 LCM-LoRA recipe on tiny:sd15, 3 steps at a large LR with an EMA of decay 0.9 and no warm-up, so the
    EMA (mostly the zero-initialised adapters) is far from the trained weights."""
    images = captioned_noise_images(tmp_path_factory.mktemp("images"))
    run = tmp_path_factory.mktemp("sd15") / "run"
    overrides = ["teacher.pretrained=tiny:sd15", "optim.lr=1e-2", "optim.warmup_steps=0", "data.batch_size=2",
                 f"data.path={images}", "data.resolution=16", "data.num_workers=0", "student.lora.rank=4",
                 "student.gradient_checkpointing=false", "train.max_steps=3", "train.checkpoint_every=3",
                 "train.ema_decay=0.9", "train.ema_warmup=false", "train.sample_every=null", "train.progress=false",
                 "train.mixed_precision=no", f"output_dir={run}"]  # fmt: skip
    train(load_recipe("lcm/sd15_lcm_lora", overrides))
    return run


def eval_student_images(run: Path) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``fewstep eval RUN``'s student (the run target, default weights) on shared noise: images in [0, 1] per step
    count, and the noise."""
    target = run_target(run, steps=list(STEPS), teacher_steps=[], device="cpu")
    student = target.samplers[0]
    assert student.info["weights"] == "ema" and student.name == "student (lcm, ema)"
    noise = shared_noise(len(PROMPTS), student.noise_shape, seed=0)
    inputs = target.inputs(len(PROMPTS), PROMPTS)
    with torch.no_grad():
        return {n: student.fn(noise, inputs, n, torch.Generator().manual_seed(n)) for n in STEPS}, noise


def stock_images(export: Path, noise: torch.Tensor) -> dict[int, torch.Tensor]:
    """The stock pipeline: the base SD1.5, the exported LoRA and scheduler, the exported pipeline arguments."""
    spec = read_schedule(export)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_path("sd15")), local_files_only=True)
    pipe.load_lora_weights(str(export), weight_name=WEIGHT_NAME)
    pipe.scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(str(export), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for n in STEPS:
        torch.manual_seed(n)
        generator = torch.Generator().manual_seed(n)
        images = pipe(
            prompt=PROMPTS, latents=noise.clone(), output_type="pt", generator=generator, **spec.call_kwargs(n)
        )
        out[n] = images.images.float()
    return out


def max_diff(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in STEPS)


def test_export_defaults_to_the_ema_weights_that_eval_samples(ema_run, tmp_path):
    ckpt = ema_run / "checkpoints" / "step_00000003"
    ema, raw = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "trainable" / "student.safetensors")
    gap = max((ema[f"student/{k}"] - v).abs().max().item() for k, v in raw.items())
    assert gap > 1e-3  # the EMA lags the trained adapters clearly

    ours, noise = eval_student_images(ema_run)
    assert ours[1].shape == (2, 3, 16, 16) and ours[2].std() > 0.01

    default = export_run(ema_run, tmp_path / "default")
    assert read_source(default) == {"run": str(ema_run), "checkpoint": str(ckpt), "weights": "ema"}
    card = (default / "README.md").read_text()
    assert "Weights: the EMA of the trained weights (`train.ema_decay`) of checkpoint `step_00000003`" in card
    diff = max_diff(stock_images(default, noise), ours)
    print(f"default (EMA) export vs fewstep eval: max |stock − fewstep| = {diff:.2e}")
    assert diff < TOLERANCE

    raw_export = export_run(ema_run, tmp_path / "raw", weights="raw")
    assert (
        read_source(raw_export)["weights"] == "raw"
        and "the trained (raw) weights" in (raw_export / "README.md").read_text()
    )
    raw_diff = max_diff(stock_images(raw_export, noise), ours)
    print(f"raw export vs fewstep eval (EMA): max |stock − fewstep| = {raw_diff:.2e}")
    assert raw_diff > 100 * TOLERANCE


def test_load_run_picks_checkpoint_and_weights_and_checks_shapes(ema_run, tmp_path):
    auto, raw = load_run(ema_run), load_run(ema_run, weights="raw")
    assert (auto.weights, raw.weights) == ("ema", "raw") and auto.checkpoint == raw.checkpoint
    assert auto.source() == {"run": str(ema_run), "checkpoint": str(auto.checkpoint), "weights": "ema"}
    ema = load_file(auto.checkpoint / "ema.safetensors")
    params = dict(auto.components.student.named_parameters())
    assert all(torch.equal(params[k.removeprefix("student/")], v) for k, v in ema.items())
    with pytest.raises(ValueError, match="weights must be one of auto, ema, raw; got 'best'"):
        load_run(ema_run, weights="best")
    with pytest.raises(FileNotFoundError, match="Set eval.every_steps"):
        load_run(ema_run, checkpoint="best")

    # A shadow of another shape is an error, never a broadcast copy.
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "resolved_config.yaml").write_text((ema_run / "resolved_config.yaml").read_text())
    copy = shutil.copytree(auto.checkpoint, broken / "checkpoints" / auto.checkpoint.name)
    key = next(k for k in ema if k.endswith("lora_B.default.weight"))
    save_file({**ema, key: ema[key][:1]}, copy / "ema.safetensors")
    write_manifest(copy, read_manifest(copy)["fingerprint"], "checkpoint", exclude=["COMPLETE"])  # hashes agree
    with pytest.raises(ValueError, match=r"other shapes \['student/.*lora_B"):
        load_run(broken)
    assert load_run(broken, weights="raw").weights == "raw"
