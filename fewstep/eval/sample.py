"""Look at a model: sample a student (a training run or an export) or a teacher for given prompts or class labels and
seeds, and write one file per sample, a labelled contact sheet and ``samples.jsonl`` (``fewstep sample``).

The target is resolved by ``fewstep.eval.targets.load_target``, as ``fewstep eval`` resolves it: a run's student
through ``fewstep.train.run.load_run`` (``checkpoint``, ``weights``), an export through stock diffusers with its
exported scheduler (``fewstep.eval.exported``), a teacher with its usual sampler and CFG. Only the first sampler of the
target is drawn (no reference teacher).

Seeds. Sample ``(input, seed)`` starts from ``torch.randn((1, *noise_shape), generator=torch.Generator().manual_seed(
seed))`` on the CPU: the initial latents a diffusers pipeline draws for one image with that generator, the same for
every prompt or label, whatever the batch. Samplers that re-noise between steps (multi-step consistency and DMD
students) continue the generator of the batch's first sample, as a pipeline continues its generator; their images at
more than one step therefore also depend on which samples share a batch (``batch_size=1``: each image is that of a
lone call with its seed). Teachers and one-step students do not re-noise.

Files in ``out_dir``: ``<i>_<prompt or label>_seed<s>_<n>steps.png`` per sample (video outputs, 5-D ``[b, c, f, h,
w]``: ``.mp4`` / ``.webp`` / ``.gif``, ``fewstep.data.video``), ``contact_sheet.png`` (one row per prompt or label and
step count, one column per seed; videos show their first frame) and ``samples.jsonl`` (one line per sample: file,
prompt or label, seed, steps, guidance and the model's identity).

``sample(spec, out_dir, ...)`` loads the target and draws it; ``sample_target(target, out_dir, ...)`` draws a target
already loaded, or a ``Target`` around a ``Sampler`` of your own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.eval.harness import EvalInputs, Sampler, to_uint8
from fewstep.eval.report import slug
from fewstep.eval.targets import Target, load_target, target_kind

RECORDS_FILE = "samples.jsonl"
SHEET_FILE = "contact_sheet.png"
MAX_SHEET_ROWS = 64  # more rows are left off the contact sheet (their files are still written)
MAX_SEED = 2**63 - 1
NAME_CHARS = 40  # of a prompt in a file name
WHAT = "Sampling target"  # how errors name the target


@dataclass(frozen=True)
class SampleInput:
    """What one row of samples is conditioned on: a ``prompt`` (text models), a class ``label`` (class-conditional
    models) or neither (unconditional); ``seed``: this row's only seed instead of the call's ``seeds``."""

    prompt: str | None = None
    label: int | None = None
    seed: int | None = None

    def text(self) -> str:
        """The row's label on the contact sheet."""
        if self.prompt is not None:
            return self.prompt
        return f"label {self.label}" if self.label is not None else "unconditional"


@dataclass
class SampleResult:
    """What ``sample`` wrote: ``out_dir``, one record per sample (the lines of ``samples.jsonl``), the contact sheet
    (``None`` when not written) and the resolved target."""

    out_dir: Path
    records: list[dict[str, Any]]
    contact_sheet: Path | None
    target: Target


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[SampleInput]:
    """Prompts from a file: ``.jsonl`` (one JSON object per line: ``prompt`` or a class ``label``, optional ``seed``)
    or text (one prompt per line). Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no prompt in it, or a ``.jsonl`` line that is not such an object (the line number is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt file {str(path)!r} does not exist: give a .txt file with one prompt per line or a .jsonl file "
            'with one {"prompt": ...} per line.'
        )
    lines = [(i, line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line]
    if not lines:
        raise ValueError(f"Prompt file {str(path)!r} is empty: put one prompt per line in it.")
    if path.suffix.lower() != ".jsonl":
        return [SampleInput(prompt=line) for _, line in lines]
    return [_jsonl_input(line, f"{path}:{i}") for i, line in lines]


def _jsonl_input(line: str, where: str) -> SampleInput:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err.msg}): write one object per line.") from None
    if not isinstance(item, dict) or set(item) - {"prompt", "label", "seed"}:
        raise ValueError(
            f'{where}: expected an object with "prompt" (text) or "label" (class) and optionally "seed"; got '
            f"{line[:80]!r}."
        )
    prompt, label, seed = item.get("prompt"), item.get("label"), item.get("seed")
    if (prompt is None) == (label is None):
        raise ValueError(f'{where}: give exactly one of "prompt" and "label"; got {line[:80]!r}.')
    if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
        raise ValueError(f'{where}: "prompt" must be a non-empty string; got {prompt!r}.')
    for key, value in (("label", label), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f'{where}: "{key}" must be an integer >= 0; got {value!r}.')
    return SampleInput(prompt=prompt.strip() if prompt is not None else None, label=label, seed=seed)


def resolve_inputs(target: Target, given: Sequence[SampleInput], all_labels: bool = False) -> list[SampleInput]:
    """Check ``given`` against what the target is conditioned on and fill in the default.

    A class-conditional model takes labels ``0..K-1`` (``all_labels``: every class in order, then the labels given;
    nothing given: every class), a text model prompts, an unconditional model neither (one row).

    Raises:
        ValueError: prompts for a class-conditional or unconditional model, labels for a text or unconditional model,
            no prompt for a text model, a label outside ``0..K-1``.
    """
    prompts = [g for g in given if g.prompt is not None]
    labels = [g for g in given if g.label is not None]
    name = f"{target.source!r}"
    if target.conditioning == "class":
        k = int(target.num_classes or 0)
        if prompts:
            raise ValueError(
                f"Prompts were given, but {name} is class-conditional (labels 0..{k - 1}), not text-conditioned: pass "
                "--labels (e.g. --labels 0,1,2 or --labels all) instead."
            )
        bad = [g.label for g in labels if not 0 <= int(g.label) < k]
        if bad:
            raise ValueError(f"Labels {bad} are outside the {k} classes of {name}: use labels 0..{k - 1} (or all).")
        every_class = [SampleInput(label=i) for i in range(k)]
        return [*every_class, *labels] if all_labels else labels or every_class
    if target.conditioning == "text":
        if labels or all_labels:
            raise ValueError(
                f"Class labels were given, but {name} is text-conditioned: pass --prompt TEXT (repeatable) or "
                "--prompts FILE instead."
            )
        if not prompts:
            raise ValueError(f"{name} is text-conditioned: give prompts (--prompt TEXT, repeatable; --prompts FILE).")
        return prompts
    if prompts or labels or all_labels:
        raise ValueError(f"{name} is unconditional: it takes no prompts or labels; give only seeds.")
    return [SampleInput()]


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    out = list(dict.fromkeys(int(s) for s in seeds))  # repeated seeds once, in order
    if not out:
        raise ValueError("No seeds: give at least one (--seeds 0,1,2 or --num-seeds N).")
    bad = [s for s in out if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"Seeds must be integers in 0..2**63-1; got {bad}.")
    return out


def _check_steps(steps: Sequence[int] | None) -> list[int] | None:
    if steps is None:
        return None
    out = list(dict.fromkeys(int(n) for n in steps))
    if not out or min(out) < 1:
        raise ValueError(f"steps must be integers >= 1 (e.g. --steps 4 or --steps 1,2,4); got {list(steps)}.")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def sample(
    target: str,
    out_dir: str | Path,
    *,
    prompts: Sequence[str] = (),
    labels: Sequence[int] | str | None = None,
    inputs: Sequence[SampleInput] = (),
    seeds: Sequence[int] = (0,),
    steps: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    checkpoint: str = "latest",
    weights: str = "auto",
    base: str | None = None,
    device: str | torch.device | None = None,
    video_format: str | None = None,
    fps: int = 8,
    contact_sheet: bool = True,
    progress: bool = True,
) -> SampleResult:
    """Sample ``target`` for every input and seed at each step count; write the files, sheet and records.

    Args:
        target: a training run directory, an export directory or a teacher (hub id, pipeline directory,
            ``tiny:<family>``, ``fewstep:<asset>``).
        out_dir: where the files go (created; files of the same name are replaced).
        prompts: prompts of a text model.
        labels: class labels of a class-conditional model, or ``"all"`` (``0..K-1``); with no prompt and no label,
            a class-conditional model gets all of its classes.
        inputs: more rows, e.g. from ``read_prompt_file`` (a row's own ``seed`` replaces ``seeds`` for it).
        seeds: the seeds of every row without its own.
        steps: step counts (default: a student's recommended count, as ``fewstep_student.json`` advertises it; a
            teacher's ``TEACHER_STEPS``).
        guidance_scale: ``w`` (Imagen convention, 1 = off; default: the student's recommended ``w`` or the teacher's
            usual one).
        batch_size: samples per sampler call.
        checkpoint, weights: which weights of a run (``fewstep.train.run.load_run``).
        base: the base pipeline of a LoRA export (default: from its model card).
        device: where to sample (default: cuda if available).
        video_format: ``mp4``, ``webp`` or ``gif`` for video outputs (default: mp4 with PyAV, else webp).
        fps: frames per second of videos.
        contact_sheet: write ``contact_sheet.png``.
        progress: show a progress bar over batches.

    Raises:
        ValueError: bad steps, seeds, batch size or guidance; inputs that do not fit the model (``resolve_inputs``).
        FileNotFoundError: a target, checkpoint or base that does not exist.
    """
    _check_options(steps, seeds, batch_size, fps, guidance_scale, video_format, labels)
    loaded = _load(target, _check_steps(steps), guidance_scale, checkpoint, weights, base, device)
    return sample_target(
        loaded, out_dir, prompts=prompts, labels=labels, inputs=inputs, seeds=seeds, steps=steps, batch_size=batch_size,
        video_format=video_format, fps=fps, contact_sheet=contact_sheet, progress=progress,
    )  # fmt: skip


def sample_target(
    target: Target,
    out_dir: str | Path,
    *,
    prompts: Sequence[str] = (),
    labels: Sequence[int] | str | None = None,
    inputs: Sequence[SampleInput] = (),
    seeds: Sequence[int] = (0,),
    steps: Sequence[int] | None = None,
    batch_size: int = 8,
    video_format: str | None = None,
    fps: int = 8,
    contact_sheet: bool = True,
    progress: bool = True,
) -> SampleResult:
    """``sample`` for a target already loaded (``fewstep.eval.targets``, or a ``Target`` of your own ``Sampler``):
    its first sampler is drawn. Arguments as for ``sample``; ``steps`` default to ``target.recommended_steps``."""
    from fewstep.data.video import default_video_format

    _check_options(steps, seeds, batch_size, fps, None, video_format, labels)
    steps, seeds = _check_steps(steps), _check_seeds(seeds)
    steps = steps or ([target.recommended_steps] if target.recommended_steps else None)
    if steps is None:
        raise ValueError(f"No recommended step count is known for {target.source!r}: pass the steps (--steps N).")
    all_labels = isinstance(labels, str)
    given = [*inputs, *(SampleInput(prompt=str(p)) for p in prompts)]
    given += [] if labels is None or all_labels else [SampleInput(label=int(i)) for i in labels]
    rows = resolve_inputs(target, given, all_labels)
    sampler = target.samplers[0]
    plan = _plan(rows, seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out_dir, rows, (video_format or default_video_format()).lower(), fps, model_identity(target),
                     sampler)  # fmt: skip
    spans = [(n, plan[i : i + batch_size]) for n in steps for i in range(0, len(plan), batch_size)]
    with (
        open(out_dir / RECORDS_FILE, "w", encoding="utf-8") as records_file,
        tqdm(total=len(spans), desc="sample", unit="batch", disable=not progress) as bar,
        sampler.context() if sampler.context is not None else nullcontext(),
    ):
        for num_steps, batch in spans:
            bar.set_postfix_str(f"{num_steps} steps", refresh=False)
            images = _draw(sampler, rows, batch, num_steps)
            for (row, seed), image in zip(batch, images):
                record = writer.write(row, seed, num_steps, image)
                records_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            records_file.flush()
            bar.update(1)
    sheet = writer.contact_sheet(steps, seeds) if contact_sheet else None
    return SampleResult(out_dir, writer.records, sheet, target)


def _check_options(
    steps: Sequence[int] | None, seeds: Sequence[int], batch_size: int, fps: int, guidance_scale: float | None,
    video_format: str | None, labels: Sequence[int] | str | None,
) -> None:  # fmt: skip
    """Every cheap check, before anything is loaded."""
    from fewstep.data.video import check_video_format

    _check_steps(steps)
    _check_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (--batch-size); got {batch_size}.")
    if fps < 1:
        raise ValueError(f"fps must be >= 1 (--fps); got {fps}.")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance); got {guidance_scale}.")
    if video_format is not None:
        check_video_format(video_format)
    if isinstance(labels, str) and labels != "all":
        raise ValueError(f"labels must be a list of class indices or 'all'; got {labels!r}.")


def _load(
    target: str, steps: list[int] | None, guidance_scale: float | None, checkpoint: str, weights: str,
    base: str | None, device: str | torch.device | None,
) -> Target:  # fmt: skip
    """The target with only its first model; an export without ``steps`` is loaded at its recommended count."""
    if steps is None and target_kind(target, WHAT) == "export":
        from fewstep.export import read_schedule

        steps = [read_schedule(target).recommended_steps]
    return load_target(
        target, steps=steps, teacher_steps=(), guidance_scale=guidance_scale, student_guidance=guidance_scale,
        device=device, checkpoint=checkpoint, weights=weights, base=base, what=WHAT,
    )  # fmt: skip


def _plan(rows: Sequence[SampleInput], seeds: Sequence[int]) -> list[tuple[int, int]]:
    """``(row index, seed)`` of every sample, samples of one seed next to each other (so they share batches)."""
    pairs = [(i, s) for i, row in enumerate(rows) for s in ([row.seed] if row.seed is not None else seeds)]
    return sorted(pairs, key=lambda pair: pair[1])


def _draw(sampler: Sampler, rows: Sequence[SampleInput], batch: Sequence[tuple[int, int]], num_steps: int) -> Tensor:
    """One batch: each sample's noise from its own seed; the re-noise continues the first sample's generator."""
    generators = [torch.Generator().manual_seed(seed) for _, seed in batch]
    noise = torch.cat([torch.randn((1, *sampler.noise_shape), generator=g) for g in generators])
    picked = [rows[i] for i, _ in batch]
    if picked[0].prompt is not None:
        inputs = EvalInputs(prompts=[r.prompt for r in picked])
    elif picked[0].label is not None:
        inputs = EvalInputs(labels=torch.tensor([r.label for r in picked]))
    else:
        inputs = EvalInputs(num_samples=len(batch))
    with torch.no_grad():
        images = sampler.fn(noise, inputs, num_steps, generators[0])
    if images.shape[0] != len(batch):
        raise ValueError(f"{sampler.name!r} returned {images.shape[0]} images for a batch of {len(batch)}.")
    return to_uint8(images)  # [b, c, h, w] or [b, c, f, h, w] uint8


# ---------------------------------------------------------------------------------------------------------------------
# Files, contact sheet, records
# ---------------------------------------------------------------------------------------------------------------------


class _Writer:
    """Writes each sample's file and record and keeps the tiles of the contact sheet."""

    def __init__(
        self, out_dir: Path, rows: Sequence[SampleInput], video_format: str, fps: int, identity: dict[str, Any],
        sampler: Sampler,
    ) -> None:  # fmt: skip
        self.out_dir, self.rows, self.video_format, self.fps = out_dir, rows, video_format, fps
        self.identity = identity
        self.guidance_scale = sampler.info.get("guidance_scale")
        self.records: list[dict[str, Any]] = []
        self.tiles: dict[tuple[int, int, int], Tensor] = {}  # (row, steps, seed) -> [c, h, w] uint8

    def write(self, row_index: int, seed: int, num_steps: int, image: Tensor) -> dict[str, Any]:
        from PIL import Image

        from fewstep.data.video import write_video

        row = self.rows[row_index]
        if row.prompt is not None:
            what = slug(row.prompt)[:NAME_CHARS].rstrip("_.") or "prompt"
        else:
            what = f"label{row.label}" if row.label is not None else ""
        stem = "_".join(part for part in (f"{row_index:04d}", what, f"seed{seed}", f"{num_steps}steps") if part)
        if image.ndim == 4:  # [c, f, h, w]: a video
            frames = image.permute(1, 2, 3, 0).numpy()  # [f, h, w, c]
            path = write_video(frames, self.out_dir / f"{stem}.{self.video_format}", self.fps)
            tile = image[:, 0]
        else:
            pixels = image.permute(1, 2, 0).numpy()
            path = self.out_dir / f"{stem}.png"
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels)).save(path)
            tile = image
        if row_index < MAX_SHEET_ROWS:
            self.tiles[(row_index, num_steps, seed)] = tile
        record: dict[str, Any] = {"file": path.name, "index": row_index}
        if row.prompt is not None:
            record["prompt"] = row.prompt
        if row.label is not None:
            record["label"] = row.label
        record.update(seed=seed, steps=num_steps, guidance_scale=self.guidance_scale, model=self.identity)
        self.records.append(record)
        return record

    def contact_sheet(self, steps: Sequence[int], seeds: Sequence[int]) -> Path | None:
        """One row per input (and step count, when there are several), one column per seed."""
        from fewstep.data.images import GAP_VALUE, save_sample_grid

        if not self.tiles:
            return None
        drawn = {key[2] for key in self.tiles}
        columns = [s for s in seeds if s in drawn] + sorted(drawn - set(seeds))  # the given seeds, then rows' own
        shape = next(iter(self.tiles.values())).shape
        blank = torch.full(shape, round(GAP_VALUE * 255), dtype=torch.uint8)
        grid_rows, labels = [], []
        for i in sorted({key[0] for key in self.tiles}):
            for n in steps:
                tiles = [self.tiles.get((i, n, s), blank) for s in columns]
                grid_rows.append(torch.stack(tiles).float() / 255)
                text = self.rows[i].text()
                labels.append(text if len(steps) == 1 else f"{n} step{'s' if n > 1 else ''}: {text}")
        return save_sample_grid(grid_rows, self.out_dir / SHEET_FILE, gap=2, row_labels=labels,
                                column_labels=[f"seed {s}" for s in columns])  # fmt: skip


def model_identity(target: Target) -> dict[str, Any]:
    """What sampled the images, JSON-ready: the target kind and path or hub id; for a run the checkpoint, its step,
    EMA or raw weights and the objective; for an export its layout, base and source run; the guidance convention;
    where a manifest lists them, the weights fingerprint and the sha256 of the weight files used."""
    from fewstep.models.teacher import GUIDANCE_CONVENTION

    info, first = target.info, target.samplers[0].info
    out: dict[str, Any] = {"kind": target.kind}
    if target.kind == "run":
        ckpt = Path(info["checkpoint"])
        out.update(path=info["path"], checkpoint=str(ckpt), checkpoint_step=_checkpoint_step(ckpt),
                   weights=info["weights"], objective=info["objective"], teacher=info["teacher"])  # fmt: skip
        out.update(_manifest_weights(ckpt, lambda rel: rel == "ema.safetensors" if info["weights"] == "ema"
                                     else rel.startswith("trainable/")))  # fmt: skip
    elif target.kind == "export":
        from fewstep.export import read_source

        out.update(path=info["path"], layout=info["layout"], base=info["base"], objective=info["spec"]["objective"],
                   weights="exported", source=read_source(info["path"]))  # fmt: skip
        out.update(_manifest_weights(Path(info["path"]), lambda rel: rel.endswith(".safetensors")))
    else:
        out.update(spec=info.get("spec", target.source), family=first.get("family"))
    out.update(scheduler=first.get("scheduler"), guidance_convention=GUIDANCE_CONVENTION)
    return out


def _checkpoint_step(ckpt: Path) -> int | None:
    try:
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_weights(directory: Path, keep: Any) -> dict[str, Any]:
    """``fingerprint`` (the hash of tensor names and shapes) and ``weights_sha256`` ({file: sha256} of the files
    ``keep`` picks) from ``directory``'s manifest; nothing without one."""
    from fewstep.train.manifest import read_manifest

    manifest = read_manifest(directory)
    if manifest is None:
        return {}
    files = {rel: entry["sha256"] for rel, entry in sorted(manifest["files"].items()) if keep(rel)}
    return {"fingerprint": manifest["fingerprint"].get("tensors"), "weights_sha256": files}
