"""Measure the activation coefficients of ``fewstep plan`` on the tiny model of each family and write them into
``fewstep/plan/activations.py`` (between its ``# coefficients:start`` / ``# coefficients:end`` markers).

    python scripts/bench/plan_coefficients.py            # every family, about a minute on one CPU thread
    python scripts/bench/plan_coefficients.py --dry-run  # print the table only

Per family and mode (fp32 / bf16 CPU autocast, each with and without diffusers' gradient checkpointing), on a rank-4
LoRA over the family's default targets, train mode, batch 2, at the two resolutions of ``FAMILIES`` (r and 2r): one
forward and backward under ``fewstep.plan.measure.LiveTensorBytes`` (exact CPU tensor bytes), after a warm-up step.

* per block class: the bytes a block leaves alive after its forward (what it saved for backward, plus its output),
  fitted as ``a`` per output element plus ``c`` per prompt token and unit of width (the part of a cross-attention
  that does not grow with the image): ``COEFFICIENTS[backbone][mode][cls]`` and ``[cls + "/text"]``;
* ``rest``: what the forward left alive outside the blocks, per element of an average block output;
* ``transient``: the step's peak above what the forward left alive, less the LoRA gradients (the planner counts those
  itself), in units of the largest block's non-checkpointed bytes;
* ``forward``: the peak of a forward without gradients (a teacher's or a frozen role's), in the same units.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewstep.plan.activations import block_hooks  # noqa: E402
from fewstep.plan.inputs import TrainingShape, backbone_forward, default_text_tokens  # noqa: E402
from fewstep.plan.measure import LiveTensorBytes  # noqa: E402

TABLE_FILE = ROOT / "fewstep" / "plan" / "activations.py"
BATCH = 2
MODES = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt")
PROMPT_FREE = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # blocks that never see the prompt: no "/text" term


def _tiny_wan() -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=86, num_layers=2,
                                 rope_max_seq_len=32)  # fmt: skip  # ffn/width 2.7 as Wan 2.1 14B


def _tiny_qwen() -> Any:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6))  # fmt: skip


def _teacher(spec: str | Any) -> Any:
    """A ``Teacher``: a zoo / asset spec through ``load_teacher``, or a bare backbone as a custom teacher."""
    from fewstep.models.loading import load_teacher
    from fewstep.models.teacher import Teacher
    from fewstep.noise.schedules import FlowSchedule

    if isinstance(spec, str):
        return load_teacher(SimpleNamespace(pretrained=spec))
    schedule = FlowSchedule.from_diffusers({"num_train_timesteps": 1000, "shift": 1.0})
    return Teacher.from_module(spec, schedule, "flow")


# backbone class -> (how to get its tiny teacher, the lower of the two resolutions in pixels, frames)
FAMILIES: dict[str, tuple[Any, int, int]] = {
    "UNet2DModel": (lambda: _teacher("fewstep:digits-vp"), 16, 1),
    "UNet2DConditionModel": (lambda: _teacher("tiny:sd15"), 64, 1),
    "SD3Transformer2DModel": (lambda: _teacher("tiny:sd3"), 32, 1),  # its pos_embed_max_size caps it at 64
    "FluxTransformer2DModel": (lambda: _teacher("tiny:flux"), 64, 1),
    "WanTransformer3DModel": (lambda: _teacher(_tiny_wan()), 64, 9),
    "QwenImageTransformer2DModel": (lambda: _teacher(_tiny_qwen()), 128, 1),
}


def measure(teacher: Any, resolution: int, frames: int, mode: str) -> dict[str, Any]:
    """One training step: each outermost block's live bytes after its forward (``blocks``: class, bytes, output
    elements per sample), the live bytes after the forward, the step's peak and the LoRA gradients' bytes."""
    from fewstep.models.student import Student

    student = Student.lora(teacher, rank=4)
    backbone = student.denoiser.backbone
    if mode.endswith("+ckpt"):
        backbone.enable_gradient_checkpointing()
    shape = TrainingShape(BATCH, resolution, default_text_tokens(backbone), frames)
    forward = backbone_forward(backbone, teacher, shape, device="cpu", dtype=torch.float32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16"))
    blocks: list[tuple[str, int, int, int]] = []  # class, bytes kept, output elements per sample, text × width
    state: dict[str, Any] = {"active": False}

    def enter(module: Any) -> None:
        if state["active"]:
            state["before"] = state["live"].current

    def leave(module: Any, size: tuple[int, int]) -> None:
        if state["active"]:  # the forward only: a recomputation under checkpointing stops blocks half-way
            numel, width = size
            kept = state["live"].current - state["before"]
            blocks.append((type(module).__name__, kept, numel, shape.text_tokens * width))

    run: dict[str, Any] = {}
    with block_hooks(backbone, enter, leave):
        for _ in range(2):  # the second step is measured: the first builds lazy caches
            blocks.clear()
            for p in backbone.parameters():
                p.grad = None
            with LiveTensorBytes() as live, autocast:
                state.update(active=True, live=live)
                output = forward()
                state["active"] = False
                after_forward = live.current
                output.float().pow(2).mean().backward()
            grads = sum(p.grad.numel() * p.grad.element_size() for p in backbone.parameters() if p.grad is not None)
            with torch.no_grad(), LiveTensorBytes() as plain, autocast:
                forward()
            run = {"blocks": list(blocks), "after_forward": after_forward, "peak": live.peak, "grads": grads,
                   "no_grad_peak": plain.peak}  # fmt: skip
    return run


def coefficients(low: dict[str, dict[str, Any]], high: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The table entries of one backbone from its runs at two resolutions (bytes per sample).

    Per block class, ``kept = a · elements + c · text_tokens · width`` solved from the two runs (the prompt part does
    not grow with the resolution): ``a`` is the class's entry, ``c`` its ``/text`` entry. ``rest`` and ``transient``
    come from the larger run.
    """
    table: dict[str, dict[str, float]] = {}
    for mode in high:
        sums = {}
        for tag, run in (("low", low[mode]), ("high", high[mode])):
            for cls, kept, numel, text in run["blocks"]:
                entry = sums.setdefault(cls, {"low": [0, 0, 0], "high": [0, 0, 0]})[tag]
                entry[0] += kept / BATCH
                entry[1] += numel
                entry[2] += text
        row: dict[str, float] = {}
        for cls, s in sorted(sums.items()):
            (k1, n1, t1), (k2, n2, _) = s["low"], s["high"]
            a = (k2 - k1) / (n2 - n1) if n2 != n1 else k2 / n2
            row[cls] = round(a, 3)
            if t1 and k1 - a * n1 > 0 and cls not in PROMPT_FREE:
                row[f"{cls}/text"] = round((k1 - a * n1) / t1, 3)
        run = high[mode]
        blocks = run["blocks"]
        mean_block = sum(numel for _, _, numel, _ in blocks) / len(blocks)
        rest = run["after_forward"] - sum(kept for _, kept, _, _ in blocks)
        row["rest"] = round(max(rest, 0) / (mean_block * BATCH), 3)
        largest = max(kept for _, kept, _, _ in high[mode.removesuffix("+ckpt")]["blocks"])
        row["transient"] = round(max(run["peak"] - run["after_forward"] - run["grads"], 0) / largest, 3)
        row["forward"] = round(run["no_grad_peak"] / largest, 3)
        table[mode] = row
    return table


def _literal(value: Any, indent: int) -> str:
    """``value`` as Python source the way the formatter lays it out: one key per line, trailing commas."""
    if not isinstance(value, dict):
        return repr(value)
    pad = " " * (indent + 4)
    items = "".join(f'{pad}"{k}": {_literal(v, indent + 4)},\n' for k, v in value.items())
    return "{\n" + items + " " * indent + "}"


def render(table: dict[str, dict[str, dict[str, float]]], measured: str) -> str:
    """The Python source between the markers."""
    words, lines, line = measured.split(" "), [], ""
    for word in words:  # the note as implicitly joined string pieces within the line length
        if len(line) + len(word) > 100:
            lines.append(line)
            line = ""
        line += word + " "
    lines.append(line.rstrip())
    note = "\n".join(f"    {piece!r}" for piece in lines).replace("'", '"')
    return f"MEASURED = (\n{note}\n)\nCOEFFICIENTS: dict[str, dict[str, dict[str, float]]] = {_literal(table, 0)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not rewrite activations.py")
    parser.add_argument("--families", default=",".join(FAMILIES), help="backbone classes to measure (comma-separated)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from fewstep.plan.activations import COEFFICIENTS

    table = dict(COEFFICIENTS)
    for name in [n for n in args.families.split(",") if n]:
        make_teacher, resolution, frames = FAMILIES[name]
        runs: dict[int, dict[str, Any]] = {}
        for res in (resolution, 2 * resolution):
            runs[res] = {}
            for mode in MODES:
                torch.manual_seed(0)
                runs[res][mode] = measure(make_teacher(), res, frames, mode)
        table[name] = coefficients(runs[resolution], runs[2 * resolution])
        print(name, table[name], flush=True)
    from results_io import today

    measured = (
        f"{today()}, torch {torch.__version__.split('+')[0]}: tiny models, rank-4 LoRA, batch {BATCH}, two "
        "resolutions each, exact CPU tensor bytes (scripts/bench/plan_coefficients.py)"
    )
    source = render(table, measured)
    if args.dry_run:
        print(source)
        return
    text = TABLE_FILE.read_text()
    pattern = re.compile(r"(# coefficients:start[^\n]*\n).*?(# coefficients:end)", re.DOTALL)
    TABLE_FILE.write_text(pattern.sub(lambda m: m.group(1) + source + "\n" + m.group(2), text, count=1))
    print(f"wrote {TABLE_FILE}")


if __name__ == "__main__":
    main()
