"""Exported students sampled by stock diffusers (``load_export``; ``fewstep.eval.targets.export_target`` makes them
an evaluation target).

The export's files are verified against its manifest before anything is loaded (a changed or added file is refused,
naming it). A LoRA export loads on its base pipeline (``--base``, else the base its manifest records), a merged export
as a pipeline (in the export directory or ``merged/``); the scheduler is the exported one and each step count runs with
``read_schedule(dir).call_kwargs(n)``. Text pipelines are called as they are (``output_type="pt"``, shared initial
latents). Class-conditional ``UNet2DModel`` exports (``DDPMPipeline`` cannot pass class labels) run the pipeline's own
loop with the stock scheduler and ``unet(x, t, class_labels=...)``, CFG on a doubled batch when the spec's
``guidance_scale`` is not 1.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.eval.harness import EvalInputs, Sampler
from fewstep.eval.samplers import backbone_of, conditioning_kind, default_device, noise_shape
from fewstep.train.manifest import read_manifest


def card_base_model(export_dir: Path) -> str | None:
    """The base model of an export: the spec its manifest records (a Hub id, local path, ``tiny:`` / ``fewstep:``
    name), else ``base_model`` from its model card header (``README.md``; exports written before manifests)."""
    manifest = read_manifest(export_dir)
    base = (manifest or {}).get("fingerprint", {}).get("base_model")
    if isinstance(base, str) and base and not base.startswith("<"):
        return base
    card = export_dir / "README.md"
    if not card.is_file():
        return None
    found = re.search(r"^base_model:\s*(.+?)\s*$", card.read_text(encoding="utf-8"), re.MULTILINE)
    return found.group(1) if found and not found.group(1).startswith("<") else None


def _export_pipeline(export_dir: Path, base: str | None) -> tuple[Any, str, str]:
    """``(pipeline, layout, base)``: the LoRA on its base, else the merged pipeline in the directory or ``merged/``."""
    from fewstep.export.lora import WEIGHT_NAME
    from fewstep.models.loading import load_pipeline

    base = base or card_base_model(export_dir)
    if (export_dir / WEIGHT_NAME).is_file():
        if base is None:
            raise FileNotFoundError(
                f"{str(export_dir)!r} holds a LoRA but no base model is known (no base_model in README.md). Pass the "
                "base pipeline with --base (a hub id, a local directory or tiny:<family>)."
            )
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(export_dir), weight_name=WEIGHT_NAME)
        return pipe, f"LoRA ({WEIGHT_NAME}) on {base}", base
    for folder in (export_dir, export_dir / "merged"):
        if (folder / "model_index.json").is_file():
            return load_pipeline(folder), f"merged pipeline ({folder})", base or ""
    raise FileNotFoundError(
        f"{str(export_dir)!r} has neither {WEIGHT_NAME} nor a pipeline (model_index.json, here or "
        "in merged/). Export the run again with `fewstep export RUN_DIR --out DIR`."
    )


def _stock_fn(pipe: Any, spec: Any, kind: str, null_class: int | None, device: torch.device) -> Any:
    """Sampling through stock diffusers: the pipeline's ``__call__`` for text models; for class-conditional
    ``UNet2DModel`` the pipeline's own loop (stock scheduler, ``unet(x, t, class_labels)``), which ``DDPMPipeline``
    cannot condition."""

    def text_fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        torch.manual_seed(generator.initial_seed())  # pipelines that re-noise from the global RNG (SD3)
        latents = noise.to(device=device, dtype=backbone_of(pipe).dtype)
        out = pipe(prompt=list(inputs.prompts or [""] * len(noise)), latents=latents, output_type="pt",
                   generator=generator, **spec.call_kwargs(num_steps))  # fmt: skip
        return out.images.float()

    def class_fn(noise: Tensor, inputs: EvalInputs, num_steps: int, generator: torch.Generator) -> Tensor:
        kwargs = spec.call_kwargs(num_steps)
        w = float(kwargs.pop("guidance_scale"))
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(device=device, **kwargs)
        unet = backbone_of(pipe)
        x = noise.to(device=device, dtype=unet.dtype) * scheduler.init_noise_sigma
        labels = inputs.labels.to(device) if inputs.labels is not None else None
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            if w == 1.0 or labels is None:
                out = unet(x_in, t, class_labels=labels).sample
            else:  # CFG on a doubled batch, Imagen convention
                null = torch.full_like(labels, int(null_class))
                out_u, out_c = unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([null, labels])).sample.chunk(2)
                out = out_u + w * (out_c - out_u)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    return text_fn if kind == "text" else class_fn


@dataclass
class ExportedStudent:
    """An exported student on its stock diffusers pipeline.

    Attributes:
        sampler: the harness ``Sampler`` (stock pipeline and exported scheduler).
        conditioning: ``class``, ``text`` or ``none``.
        num_classes: classes of a class-conditional pipeline.
        layout: how it was loaded (LoRA on its base, or a merged pipeline).
        base: the base pipeline of a LoRA (``""`` when unknown).
        spec: the export's ``SamplingSpec``.
    """

    sampler: Sampler
    conditioning: str
    num_classes: int | None
    layout: str
    base: str
    spec: Any


def load_export(
    export_dir: str | Path,
    *,
    steps: Sequence[int] = (1, 2, 4, 8),
    base: str | None = None,
    device: str | torch.device | None = None,
    guidance_scale: float | None = None,
) -> ExportedStudent:
    """Load an exported student into its stock diffusers pipeline with the exported scheduler.

    Args:
        export_dir: a directory written by ``fewstep export`` (``fewstep_student.json``, ``scheduler/``, LoRA or
            pipeline); its files are checked against its ``manifest.json`` first (``verify_export``).
        steps: student step counts; each must be one the export lists (``fewstep_student.json``).
        base: the base pipeline of a LoRA (default: the card's ``base_model``).
        device: where to sample.
        guidance_scale: the pipeline's ``guidance_scale`` instead of the exported one (``fewstep_student.json``).
    """
    from fewstep.export import read_schedule
    from fewstep.export.files import verify_export

    export_dir = Path(export_dir)
    verify_export(export_dir)  # every file as exported (sha256), before any of them is parsed
    spec = read_schedule(export_dir)
    guidance_source = "fewstep_student.json"
    if guidance_scale is not None:
        spec, guidance_source = dataclasses.replace(spec, guidance_scale=float(guidance_scale)), "given"
    missing = [n for n in steps if n not in spec.steps]
    if missing:
        raise ValueError(f"{str(export_dir)!r} exports schedules for {sorted(spec.steps)} steps, not {missing}.")
    device = torch.device(device) if device is not None else default_device()
    pipe, layout, base = _export_pipeline(export_dir, base)
    pipe.scheduler = spec.scheduler()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    kind, num_classes, null_class = conditioning_kind(pipe)
    info = {"kind": "student", "source": f"{export_dir} ({layout})", "weights": "exported", "objective": spec.objective,
            "guidance_scale": spec.guidance_scale, "guidance_source": guidance_source,
            "guidance_convention": spec.guidance_convention,
            "scheduler": f"stock diffusers {spec.scheduler_class} via {type(pipe).__name__}"
            + ("" if kind == "text" else " loop with class_labels")}  # fmt: skip
    sampler = Sampler(
        name=f"student ({spec.objective}, exported)", fn=_stock_fn(pipe, spec, kind, null_class, device),
        noise_shape=noise_shape(pipe), steps=list(steps), network=backbone_of(pipe), info=info,
        schedule=lambda n: {"scheduler": spec.scheduler_class, **spec.steps[n], "call": spec.call_kwargs(n)},
    )  # fmt: skip
    return ExportedStudent(sampler, kind, num_classes, layout, base, spec)
