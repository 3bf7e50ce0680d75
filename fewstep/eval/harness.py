"""The evaluation harness: sample named models at lists of step counts from the same seeded noise and the
same labels / prompts, measure every ``Metric``, NFE, warm latency and peak memory, and write a report that says
what makes its numbers comparable.

``evaluate(samplers, metrics, inputs, ...)`` does, for every ``Sampler`` and each of its step counts (one *row*):

1. one untimed warm-up batch, then the images in batches of ``batch_size`` (a tqdm bar over all rows);
2. NFE per image: a forward pre-hook on the sampler's ``network`` counts the samples that pass through it, so a CFG
   step on a doubled batch counts 2; divided by the number of images;
3. seconds per image: the median over timed batches of ``seconds / batch size`` (extra timed repeats of the first
   batch when the row has fewer than ``timing_repeats`` full batches; CUDA is synchronised around each batch);
4. peak memory: ``torch.cuda.max_memory_allocated`` on a GPU (reset per row, so it includes resident weights); on
   a CPU the increase of the process's peak resident set over its value at the row's start (Linux: the peak is
   reset per row through ``/proc/self/clear_refs``; elsewhere ``resource.getrusage``'s lifetime peak);
5. the images are quantised to 8 bits (exactly what the PNGs hold) and every metric is computed on them. A video
   model's clips ``[n, c, f, h, w]`` are measured frame by frame (``frames_of``): every frame is an image of its
   clip's label or prompt, as per-frame FID treats them.

With ``out_dir`` the report is written there (``fewstep.eval.report``): ``eval.json`` (every number and every
comparability field), ``eval.md`` (the table and the same fields as a list), with ``save_images`` one PNG per image in
``images/<model>_<n>steps/`` (a video per clip), with ``save_grids`` one grid per row in ``grids/`` and the overview
``grid.png`` (a video row shows the frames of its first clips).
Measurements live in ``fewstep.eval.measure``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewstep.eval.measure import NFECounter, PeakMemory, environment, sync
from fewstep.eval.metric import INPUTS, Metric
from fewstep.eval.report import EvalReport, Row, jsonable, unique_slugs, write_report, write_row_images

REPORT_VERSION = 1
DEFAULT_PROMPTS = ("a photo of a cat", "a red apple on a table", "a mountain lake at sunrise", "a city street at night")


@dataclass
class EvalInputs:
    """What the images of an evaluation are conditioned on: class ``labels`` ``[n]``, ``prompts`` (n strings), or
    neither (unconditional). Image ``i`` of every row gets entry ``i``."""

    labels: Tensor | None = None
    prompts: list[str] | None = None
    num_samples: int | None = None  # for unconditional inputs (no labels, no prompts)

    def __len__(self) -> int:
        if self.labels is not None:
            return int(self.labels.shape[0])
        if self.prompts is not None:
            return len(self.prompts)
        return int(self.num_samples or 0)

    @property
    def available(self) -> frozenset[str]:
        """The inputs a metric may need (``Metric.needs``) that these inputs provide."""
        return frozenset(k for k in INPUTS if getattr(self, k) is not None)

    def slice(self, start: int, stop: int) -> EvalInputs:
        return EvalInputs(
            self.labels[start:stop] if self.labels is not None else None,
            self.prompts[start:stop] if self.prompts is not None else None,
            stop - start,
        )

    def describe(self) -> dict[str, Any]:
        """The conditioning, JSON-ready (label histogram or the distinct prompts)."""
        if self.labels is not None:
            counts = torch.bincount(self.labels.long()).tolist()
            return {"kind": "class labels", "per_class": counts, "order": "labels 0..K-1 cycled"}
        if self.prompts is not None:
            distinct = list(dict.fromkeys(self.prompts))
            return {"kind": "prompts", "num_distinct": len(distinct), "prompts": distinct[:100], "order": "cycled"}
        return {"kind": "unconditional"}


def balanced_labels(num_samples: int, num_classes: int) -> EvalInputs:
    """Labels ``0, 1, …, K-1, 0, 1, …`` (every class equally often, up to one)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    return EvalInputs(labels=torch.arange(num_samples) % num_classes)


def cycled_prompts(prompts: Sequence[str], num_samples: int) -> EvalInputs:
    """``num_samples`` prompts: the list cycled (prompt ``i % len(prompts)`` for image ``i``)."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("The prompt list is empty: give at least one prompt (a list or a file, one per line).")
    return EvalInputs(prompts=[prompts[i % len(prompts)] for i in range(num_samples)])


def conditioned_inputs(
    conditioning: str, num_samples: int, num_classes: int | None = None, prompts: Sequence[str] | None = None
) -> EvalInputs:
    """The inputs of ``num_samples`` images for a model conditioned on ``class`` (balanced labels over
    ``num_classes``), ``text`` (``prompts`` cycled, default ``DEFAULT_PROMPTS``) or ``none``."""
    if conditioning == "class":
        return balanced_labels(num_samples, int(num_classes or 1))
    if conditioning == "text":
        return cycled_prompts(prompts or DEFAULT_PROMPTS, num_samples)
    return EvalInputs(num_samples=num_samples)


def frames_of(images: Tensor, inputs: EvalInputs) -> tuple[Tensor, EvalInputs]:
    """What metrics see of a row: images ``[n, c, h, w]`` as they are; clips ``[n, c, f, h, w]`` as their frames
    ``[n·f, c, h, w]`` (clip by clip), each frame with its clip's label or prompt."""
    if images.ndim != 5:
        return images, inputs
    n, c, f, h, w = images.shape
    return images.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w), per_frame(inputs, f)


def per_frame(inputs: EvalInputs, num_frames: int) -> EvalInputs:
    """``inputs`` with each entry repeated ``num_frames`` times: the inputs of clips' frames (``frames_of``)."""
    if num_frames == 1:
        return inputs
    labels = inputs.labels.repeat_interleave(num_frames) if inputs.labels is not None else None
    prompts = [p for p in inputs.prompts for _ in range(num_frames)] if inputs.prompts is not None else None
    return EvalInputs(labels, prompts, len(inputs) * num_frames)


# A sampler's function: (noise [b, *noise_shape] on the CPU, inputs of these b images, num_steps, generator)
# -> images [b, c, h, w] in [0, 1] (any device; moved to the CPU by the harness).
SampleFn = Callable[[Tensor, EvalInputs, int, torch.Generator], Tensor]


@dataclass
class Sampler:
    """One model of an evaluation (one block of rows in the table).

    Attributes:
        name: the row label (unique within an evaluation), e.g. ``"teacher (DDIM, w=2)"``.
        fn: draws images (``SampleFn``); it moves noise and inputs to its own device.
        noise_shape: the shape of one image's initial noise (latents ``[4, 8, 8]``, pixels ``[1, 8, 8]``); samplers
            with the same shape get identical noise.
        steps: the step counts to evaluate.
        network: the backbone whose forward calls are the network evaluations (NFE); ``None``: NFE not counted.
        info: provenance, JSON-ready: ``kind`` (teacher / student), ``source``, ``weights`` (ema / raw /
            pretrained / exported), ``guidance_scale``, ``scheduler``, ...
        schedule: per step count, the timesteps / levels that step count uses (for the report).
        context: entered once around all of this sampler's rows, e.g. ``Student.sampling`` (eval mode set once, a
            LoRA merged into its base as ``fuse_lora()`` does).
    """

    name: str
    fn: SampleFn
    noise_shape: tuple[int, ...]
    steps: list[int]
    network: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)
    schedule: Callable[[int], dict[str, Any]] | None = None
    context: Callable[[], AbstractContextManager[Any]] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------------


def shared_noise(num_samples: int, shape: Sequence[int], seed: int) -> Tensor:
    """The evaluation's initial noise ``[n, *shape]``: ``torch.randn`` from a CPU generator seeded with ``seed``."""
    return torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(seed))


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[0, 1]`` to ``uint8`` on the CPU (round to nearest), as a PNG stores them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def check_metrics(metrics: Sequence[Metric], inputs: EvalInputs) -> None:
    """Every metric is a ``Metric`` with a unique name whose ``needs`` the inputs provide; else one clear error."""
    problems = []
    names = [getattr(m, "name", type(m).__name__) for m in metrics]
    for metric, name in zip(metrics, names):
        if not isinstance(metric, Metric):
            problems.append(
                f"{type(metric).__name__} is not a Metric (name, needs, higher_is_better, compute, describe)"
            )
            continue
        missing = set(metric.needs) - inputs.available
        if missing:
            have = ", ".join(sorted(inputs.available)) or "none (unconditional)"
            problems.append(f"metric {name!r} needs {', '.join(sorted(missing))} but the inputs have {have}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"metric names must be unique; repeated: {dupes}")
    if problems:
        raise ValueError("Cannot evaluate: " + "; ".join(problems) + ". Drop those metrics or change the inputs.")


def evaluate(
    samplers: Sequence[Sampler],
    metrics: Sequence[Metric],
    inputs: EvalInputs,
    *,
    seed: int = 0,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    save_images: bool = True,
    save_grids: bool = True,
    grid_images: int = 16,
    warmup: bool = True,
    timing_repeats: int = 3,
    device: str | torch.device | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    finish: Callable[[EvalReport], None] | None = None,
) -> EvalReport:
    """Sample every sampler at each of its step counts from the same noise and inputs, and measure everything.

    Args:
        samplers: the models (unique names).
        metrics: ``Metric`` objects; each is computed on every row's images (``[n, c, h, w]`` in ``[0, 1]``).
        inputs: labels / prompts for the ``n = len(inputs)`` images of every row.
        seed: seeds the shared noise (``shared_noise``) and, with ``seed + 1``, each row's sampler generator.
        batch_size: images per sampler call.
        out_dir: where ``eval.json``, ``eval.md``, images and grids go (``None``: nothing is written).
        save_images: write one PNG per image (only with ``out_dir``).
        save_grids: write one grid per row and the overview grid (only with ``out_dir``).
        grid_images: images per grid row (the first ones of each row).
        warmup: one untimed batch per row before the timed ones.
        timing_repeats: at least this many timed batches per row (the first batch is repeated if needed).
        device: where the samplers run (memory and synchronisation); default: the first network's device.
        progress: show a tqdm bar.
        info: extra fields for the report header (target, checkpoint, ...).
        finish: called with the report before it is written, to add rows or derived columns (e.g. a cached
            reference row and the diversity ratio, ``fewstep.eval.coverage``).

    Returns:
        An ``EvalReport``; with ``out_dir`` it is written there too (``write_report``).
    """
    n = len(inputs)
    if n < 1:
        raise ValueError("Nothing to evaluate: the inputs hold no images (num_samples must be >= 1).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    names = [s.name for s in samplers]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Sampler names must be unique and at least one is needed; got {names}.")
    check_metrics(metrics, inputs)
    device = torch.device(device) if device is not None else _first_device(samplers)
    memory = PeakMemory(device)
    batches = math.ceil(n / batch_size)
    total = sum(len(s.steps) for s in samplers) * batches
    out_dir = Path(out_dir) if out_dir is not None else None
    slugs = unique_slugs(names)
    rows, noise_cache = [], {}
    with tqdm(total=total, desc="eval", unit="batch", disable=not progress) as bar:
        run = _RowSettings(inputs, seed, batch_size, warmup, timing_repeats, device, memory, metrics, grid_images, bar)
        for sampler in samplers:
            shape = tuple(sampler.noise_shape)
            if shape not in noise_cache:
                noise_cache[shape] = shared_noise(n, shape, seed)
            with sampler.context() if sampler.context is not None else nullcontext():
                rows += _rows(sampler, noise_cache[shape], run, out_dir if save_images else None, slugs)
    report = EvalReport(rows, _header(samplers, metrics, inputs, seed, batch_size, device, memory, info))
    if finish is not None:
        finish(report)
    if out_dir is not None:
        write_report(report, out_dir, save_grid=save_grids)
    return report


@dataclass(frozen=True)
class _RowSettings:
    """What every row of one ``evaluate`` call shares (see its arguments)."""

    inputs: EvalInputs
    seed: int
    batch_size: int
    warmup: bool
    timing_repeats: int
    device: torch.device
    memory: PeakMemory
    metrics: Sequence[Metric]
    grid_images: int
    bar: Any


def _rows(
    sampler: Sampler, noise: Tensor, run: _RowSettings, image_dir: Path | None, slugs: dict[str, str]
) -> list[Row]:
    """One row per step count of ``sampler`` (images written to ``image_dir`` when given)."""
    rows = []
    for num_steps in sampler.steps:
        run.bar.set_postfix_str(f"{sampler.name} @ {num_steps}", refresh=False)
        row, images = _row(sampler, num_steps, noise, run)
        if image_dir is not None:
            write_row_images(row, images, image_dir, f"{slugs[sampler.name]}_{num_steps}steps")
        rows.append(row)
    return rows


def _first_device(samplers: Sequence[Sampler]) -> torch.device:
    for s in samplers:
        if s.network is not None:
            param = next(s.network.parameters(), None)
            if param is not None:
                return param.device
    return torch.device("cpu")


def _call(sampler: Sampler, noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator,
          device: torch.device) -> Tensor:  # fmt: skip
    """One sampler call without gradients (CUDA synchronised after it)."""
    with torch.no_grad():
        out = sampler.fn(noise, inputs, num_steps, generator)
    sync(device)
    if out.shape[0] != noise.shape[0]:
        raise ValueError(f"{sampler.name!r} returned {out.shape[0]} images for a batch of {noise.shape[0]}.")
    return out


def _spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def sample_images(
    sampler: Sampler,
    num_steps: int,
    inputs: EvalInputs,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[Tensor, float | None]:
    """One row's images exactly as ``evaluate`` draws them (the same noise, inputs and generator), untimed.

    Returns:
        ``(images [n, c, h, w] uint8 (clips [n, c, f, h, w]), NFE per image)`` (NFE ``None`` when the sampler has no
        ``network``).
    """
    n = len(inputs)
    if n < 1:
        raise ValueError("Nothing to sample: the inputs hold no images.")
    device = torch.device(device) if device is not None else _first_device([sampler])
    noise = shared_noise(n, sampler.noise_shape, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    counter, chunks = NFECounter(sampler.network), []
    spans = _spans(n, batch_size)
    with sampler.context() if sampler.context is not None else nullcontext(), counter.counting():
        for start, stop in tqdm(spans, desc=f"{sampler.name} @ {num_steps}", unit="batch", disable=not progress):
            out = _call(sampler, noise[start:stop], inputs.slice(start, stop), num_steps, generator, device)
            chunks.append(to_uint8(out))
    return torch.cat(chunks), (counter.samples / n if sampler.network is not None else None)


def _row(sampler: Sampler, num_steps: int, noise: Tensor, run: _RowSettings) -> tuple[Row, Tensor]:
    """One row; returns it with its images (``[n, c, h, w]`` uint8, clips ``[n, c, f, h, w]``)."""
    n, inputs, seed, memory = noise.shape[0], run.inputs, run.seed, run.memory
    spans = _spans(n, run.batch_size)

    def call(start: int, stop: int, generator: torch.Generator) -> Tensor:
        return _call(sampler, noise[start:stop], inputs.slice(start, stop), num_steps, generator, run.device)

    memory.start()
    if run.warmup:
        call(*spans[0], torch.Generator().manual_seed(seed + 1))
    generator = torch.Generator().manual_seed(seed + 1)
    counter, chunks, timings = NFECounter(sampler.network), [], []
    with counter.counting():
        for start, stop in spans:
            began = time.perf_counter()
            out = call(start, stop, generator)
            elapsed = time.perf_counter() - began
            chunks.append(to_uint8(out))
            if stop - start == spans[0][1] - spans[0][0]:
                timings.append(elapsed / (stop - start))
            run.bar.update(1)
    for _ in range(max(0, run.timing_repeats - len(timings))):
        began = time.perf_counter()
        call(*spans[0], torch.Generator().manual_seed(seed + 1))
        timings.append((time.perf_counter() - began) / (spans[0][1] - spans[0][0]))
    peak = memory.stop_mib()
    images = torch.cat(chunks)  # [n, c, h, w] uint8 ([n, c, f, h, w]: clips)
    frames, frame_inputs = frames_of(images, inputs)
    as_float = frames.float() / 255
    row = Row(
        model=sampler.name,
        num_steps=num_steps,
        num_images=n,
        nfe_per_image=counter.samples / n if sampler.network is not None else None,
        seconds_per_image=statistics.median(timings),
        peak_memory_mib=peak,
        metrics=compute_metrics(run.metrics, as_float, frame_inputs),
        schedule=jsonable(sampler.schedule(num_steps)) if sampler.schedule is not None else {},
        preview=as_float[: run.grid_images],
    )
    return row, images


def data_row(name: str, images: Tensor, metrics: Sequence[Metric], inputs: EvalInputs) -> Row:
    """A report row of real images (``[n, c, h, w]`` in ``[0, 1]``, quantised to 8 bits as sampled rows are) through
    the same metrics: no steps, NFE or timing."""
    quantised = to_uint8(images).float() / 255
    values = compute_metrics(metrics, quantised, inputs)
    return Row(name, None, len(quantised), None, None, None, values)


def compute_metrics(metrics: Sequence[Metric], images: Tensor, inputs: EvalInputs) -> dict[str, float]:
    """Every metric of one image set (``[n, c, h, w]`` in ``[0, 1]``), each given the inputs it needs."""
    values = {}
    for metric in metrics:
        labels = inputs.labels if "labels" in metric.needs else None
        prompts = inputs.prompts if "prompts" in metric.needs else None
        values[metric.name] = float(metric.compute(images, labels=labels, prompts=prompts))
    return values


# ---------------------------------------------------------------------------------------------------------------------
# The report header: what makes the numbers comparable
# ---------------------------------------------------------------------------------------------------------------------


def _header(
    samplers: Sequence[Sampler],
    metrics: Sequence[Metric],
    inputs: EvalInputs,
    seed: int,
    batch_size: int,
    device: torch.device,
    memory: PeakMemory,
    info: dict[str, Any] | None,
) -> dict[str, Any]:
    from fewstep.models.teacher import GUIDANCE_CONVENTION

    return {
        "report_version": REPORT_VERSION,
        **jsonable(info or {}),
        "num_samples": len(inputs),
        "seed": seed,
        "noise": f"torch.randn([n, *noise_shape], generator=torch.Generator().manual_seed({seed})) on the CPU, the "
        "same tensor for every model with the same noise shape; each row's sampler generator (re-noising) is "
        f"seeded with {seed + 1}",
        "batch_size": batch_size,
        "inputs": inputs.describe(),
        "guidance_convention": GUIDANCE_CONVENTION,
        "images": "decoded to [0, 1], quantised to 8 bits (as saved in the PNGs) before every metric; a video's "
        "clips are measured frame by frame, each frame with its clip's label or prompt",
        "metrics": {m.name: jsonable({"higher_is_better": m.higher_is_better, **m.describe()}) for m in metrics},
        "models": {s.name: jsonable({"noise_shape": list(s.noise_shape), **s.info}) for s in samplers},
        "nfe": "samples through the network's forward per image (a CFG step on a doubled batch counts 2)",
        "latency": "seconds per image: median over timed batches (after one warm-up batch) of batch seconds / batch "
        "size, sampling and decoding included",
        "memory": memory.kind,
        "environment": environment(device),
    }
