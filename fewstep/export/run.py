"""Export a trained student: from objects (``export_student``) or from a run directory (``export_run``).

Layout of an export directory:

* ``pytorch_lora_weights.safetensors`` (LoRA students with ``export.lora``): ``pipe.load_lora_weights(dir)``;
  with ``export.kohya`` also ``pytorch_lora_weights_kohya.safetensors`` (ComfyUI / kohya keys,
  ``fewstep.export.kohya``);
  Wan 2.2 also ``pytorch_lora_weights_transformer_2.safetensors``, the low-noise expert's (``load_into_transformer_2``);
* the merged pipeline (full students, or ``export.merged``): in the directory itself for a full student (so it
  loads with ``DiffusionPipeline.from_pretrained(dir)``), in ``merged/`` next to a LoRA;
* ``scheduler/scheduler_config.json``: the student's diffusers scheduler; ``fewstep_student.json``: the exact
  schedules, recommended steps and guidance with their convention, and (``export_run``) under ``source`` the run,
  checkpoint and weights (``ema`` or ``raw``) it was exported from; ``README.md``: the model card;
* ``manifest.json``: the sha256 of every file and a fingerprint of the weights (``fewstep.export.files``).

The export is written into a staging directory next to ``out_dir`` and renamed into place once complete: an export
that fails leaves ``out_dir`` as it was, and an older export there is replaced whole (none of its files survive).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fewstep.export.card import card_base_model, write_card
from fewstep.export.files import KIND, export_fingerprint, staged_directory
from fewstep.export.kohya import save_kohya
from fewstep.export.lora import TRANSFORMER_2_WEIGHT_NAME, save_lora, save_merged, save_student
from fewstep.models.backbones import latent_shape
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher
from fewstep.objectives.protocol import Objective
from fewstep.objectives.spec import SPEC_FILE, SamplingSpec, read_student_file, write_schedule
from fewstep.train.manifest import write_manifest
from fewstep.train.run import load_run

logger = logging.getLogger(__name__)

SOURCE_KEY = "source"  # fewstep_student.json: the run, checkpoint and weights an export_run took


def sampling_spec(objective: Objective, teacher: Teacher | None = None) -> SamplingSpec:
    """The objective's ``sampling_spec()``: how its student is sampled with a stock diffusers scheduler.

    A guidance-distilled teacher (FLUX.1-dev: ``guidance_embeds``) takes its guidance as an input the student saw in
    training (``teacher.guidance_scale`` of the recipe, e.g. 3.5); its pipeline embeds ``guidance_scale``, so that is
    the value to pass, not the 1 of "no CFG"."""
    spec = objective.sampling_spec()
    if teacher is not None and teacher.family == "zimage":
        return zimage_sampling_spec(spec)
    embedded = teacher.null_cond.guidance if teacher is not None and teacher.null_cond is not None else None
    if embedded is None:
        return spec
    value = float(embedded.flatten()[0])
    note = (
        f"The base model takes guidance as an embedded input; the student was trained at {value:g}: pass "
        f"guidance_scale={value:g} (no classifier-free guidance: one evaluation per step)."
    )
    convention = f"embedded guidance {value:g} (the pipeline's guidance_scale); no CFG"
    return replace(spec, guidance_scale=value, notes=[*spec.notes, note], guidance_convention=convention)


def zimage_sampling_spec(spec: SamplingSpec) -> SamplingSpec:
    """``ZImagePipeline`` guides as ``pos + g·(pos − neg)`` and runs no CFG at ``g = 0``: the spec's Imagen ``w`` is
    passed as its ``guidance_scale = w − 1`` (a student sampled without CFG: 0, not 1)."""
    g = spec.guidance_scale - 1.0
    convention = (
        f"ZImagePipeline: pos + guidance_scale·(pos − neg), 0 is no CFG (Imagen w = {spec.guidance_scale:g}); "
        f"training: {spec.guidance_convention}"
    )
    return replace(spec, guidance_scale=g, guidance_convention=convention)


def export_student(
    student: Student,
    teacher: Teacher,
    objective: Any,
    out_dir: str | Path,
    *,
    lora: bool = True,
    merged: bool = False,
    kohya: bool = False,
    base_model: str | None = None,
    description: str = "",
    evaluation: str | None = None,
    source: dict[str, str] | None = None,
    hub_id: str | None = None,
) -> Path:
    """Write the LoRA and/or merged pipeline, the scheduler config and spec, and the model card.

    Args:
        student, teacher, objective: the trained components (``build_components`` + loaded weights).
        out_dir: the export directory: created, or replaced whole if it holds an earlier export (see the module
            docstring); a non-empty directory that is not an export is refused.
        lora: write ``pytorch_lora_weights.safetensors`` for a LoRA student.
        merged: also write a merged pipeline for a LoRA student (a full student is always written merged).
        kohya: also write the LoRA with ComfyUI / kohya keys (``fewstep.export.kohya``).
        base_model: the teacher's spec (Hub id, path, ``tiny:`` / ``fewstep:`` name; default: the pipeline's
            ``name_or_path``), recorded in the manifest; the card names what ``from_pretrained`` takes for it.
        description: free text for the card.
        evaluation: the card's evaluation section (Markdown), e.g. ``fewstep.eval.card.evaluation_section``'s.
        source: where the weights came from, ``{"run", "checkpoint", "weights"}`` (``LoadedRun.source()``); written
            into ``fewstep_student.json`` (key ``source``) and the card.
        hub_id: the Hub repository this export is for (``fewstep.export.hub.push_export``): the card loads it from
            there, and the manifest records it; ``None``: the card loads it from ``out_dir``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    spec = sampling_spec(objective, teacher)
    pipe_cls = type(teacher.pipeline)
    named = base_model or getattr(teacher.pipeline, "name_or_path", None)
    base = str(named or "<base model>")
    usage = _usage(teacher)
    with staged_directory(out_dir) as staging:
        wrote_lora = wrote_kohya = False
        if student.is_lora and lora:
            if hasattr(pipe_cls, "save_lora_weights"):
                save_lora(student, teacher, staging)
                wrote_lora = True
                if kohya:
                    save_kohya(student, teacher, staging)
                    wrote_kohya = True
            else:
                logger.warning("%s cannot load LoRA files; writing a merged pipeline instead.", pipe_cls.__name__)
        if not wrote_lora or merged:
            save_merged(student, teacher, staging / ("merged" if wrote_lora else ""), scheduler=spec.scheduler(),
                        guidance_scale=spec.guidance_scale)  # fmt: skip
        write_schedule(spec, staging)
        if source is not None:
            _write_source(staging, source)
        objective.export_extra(staging, lambda extra, path: save_student(extra, teacher, path))  # e.g. AGD adapters
        write_card(
            staging, spec, pipeline_class=pipe_cls.__name__, base_model=card_base_model(base) if named else base,
            student_path=hub_id or str(out_dir.resolve()),
            lora=wrote_lora, merged_path="merged" if wrote_lora and merged else None, kohya=wrote_kohya,
            lora_2=(staging / TRANSFORMER_2_WEIGHT_NAME).is_file(),
            description=description, evaluation=evaluation, source=source, **usage,
        )  # fmt: skip
        fields = {"family": teacher.family, "objective": spec.objective, "base_model": base,
                  "layout": "lora" if wrote_lora else "merged", **({"hub_id": hub_id} if hub_id else {})}  # fmt: skip
        write_manifest(staging, export_fingerprint(staging, **fields), KIND)
    return out_dir


def _usage(teacher: Teacher) -> dict[str, Any]:
    """How the card's snippet calls the pipeline: text-to-image, or a pixel ``UNet2DModel`` (class-conditional or
    unconditional) sampled in a written-out loop."""
    if teacher.family != "unet2d":
        return {"conditioning": "text"}
    num_classes = getattr(teacher.denoiser.backbone.config, "num_class_embeds", None)
    return {"conditioning": "class" if num_classes else "none", "sample_shape": latent_shape(teacher, 1)[1:],
            "null_class": num_classes - 1 if num_classes else None}  # fmt: skip


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    checkpoint: str | Path = "latest",
    weights: str = "auto",
    teacher: Teacher | None = None,
    evaluation: Callable[[dict[str, str]], str | None] | None = None,
    hub_id: str | None = None,
) -> Path:
    """Export one checkpoint of a training run, with the weights ``fewstep eval`` samples by default.

    Rebuilds teacher, student and objective from ``<run_dir>/resolved_config.yaml`` and loads the checkpoint
    (``fewstep.train.run.load_run``: EMA weights when the run kept them), then writes what the recipe's ``export``
    block asks for (``export_student``). ``fewstep_student.json`` and the model card record the run, the checkpoint
    and the weights (``read_source``).

    Args:
        run_dir: the run directory (the recipe's ``output_dir``).
        out_dir: where to write; ``<run_dir>/export`` by default.
        checkpoint: ``latest`` (the newest complete checkpoint), ``best`` or a checkpoint directory.
        weights: ``auto`` (EMA when the checkpoint has it, else raw), ``ema`` or ``raw``.
        teacher: the run's custom teacher, if it was trained with one.
        evaluation: called with the loaded weights' source (``{"run", "checkpoint", "weights"}``) once the checkpoint
            is chosen; returns the card's evaluation section or ``None`` (``fewstep.eval.card.evaluation_section``
            finds the run's eval report of exactly these weights; ``fewstep export`` passes it).
        hub_id: the Hub repository the export is for (see ``export_student``).

    Raises:
        FileNotFoundError: no resolved config or no such complete checkpoint in ``run_dir``, or ``ema`` for a run
            without EMA.
    """
    run = load_run(run_dir, checkpoint, weights, teacher)
    recipe, components = run.recipe, run.components
    return export_student(
        components.student, components.teacher, components.objective, out_dir or Path(run_dir) / "export",
        lora=recipe.export.lora, merged=recipe.export.merged, kohya=recipe.export.kohya,
        base_model=recipe.teacher.pretrained, description=recipe.description, source=run.source(),
        evaluation=evaluation(run.source()) if evaluation is not None else None, hub_id=hub_id,
    )  # fmt: skip


def read_source(export_dir: str | Path) -> dict[str, str] | None:
    """Where an export's weights came from: ``{"run", "checkpoint", "weights"}`` (``weights``: ``ema`` or ``raw``),
    or ``None`` for a student exported from objects or by an older fewstep."""
    return read_student_file(export_dir).get(SOURCE_KEY)


def _write_source(export_dir: Path, source: dict[str, str]) -> None:
    path = export_dir / SPEC_FILE
    data = json.loads(path.read_text())
    data[SOURCE_KEY] = dict(source)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
