"""Student weights in the formats diffusers loads as they are.

* ``save_lora``: ``pytorch_lora_weights.safetensors`` through the pipeline class's own ``save_lora_weights``, with
  the adapter metadata (without it diffusers loses ``lora_alpha``): UNet pipelines get
  ``get_peft_model_state_dict(unet)`` + ``unet_lora_adapter_metadata``; transformer pipelines (SD3, Flux) the raw
  ``get_peft_model_state_dict(transformer)`` + ``transformer_lora_adapter_metadata`` (diffusers'
  ``convert_state_dict_to_diffusers`` silently drops their attention LoRA layers).
  ``pipe.load_lora_weights(dir, weight_name=WEIGHT_NAME)`` reloads it. Wan 2.2 (two experts) gets one file per
  pipeline component: ``transformer``'s in ``WEIGHT_NAME``, ``transformer_2``'s in ``TRANSFORMER_2_WEIGHT_NAME``
  (``pipe.load_lora_weights(dir, weight_name=TRANSFORMER_2_WEIGHT_NAME, load_into_transformer_2=True)``); both carry
  diffusers' ``transformer.`` keys, as that loader expects.
* ``save_merged``: the LoRA fused into a copy of the backbone (or the full student's backbone) inside a copy of the
  teacher's pipeline, with the student's scheduler, written with ``save_pretrained``.
* ``save_student``: a LoRA where the pipeline loads one, a merged pipeline otherwise (further students an objective
  exports, e.g. Phased DMD's experts).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fewstep.models.backbones import WAN_EXPERT_COMPONENTS, WanExperts
from fewstep.models.student import Student
from fewstep.models.teacher import Teacher

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Wan 2.2's low-noise expert; the name must not end in WEIGHT_NAME, or diffusers' guess of the file to load from a
# folder (`load_lora_weights(dir)`) would see two candidates
TRANSFORMER_2_WEIGHT_NAME = "pytorch_lora_weights_transformer_2.safetensors"


def backbone_component(teacher: Teacher) -> str:
    """The pipeline attribute that holds the teacher's backbone: ``unet`` or ``transformer``."""
    pipe = _require_pipeline(teacher, "export")
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is teacher.denoiser.backbone:
            return name
    raise ValueError(
        f"The teacher's backbone ({type(teacher.denoiser.backbone).__name__}) is not the `unet` or `transformer` "
        f"of its pipeline {type(pipe).__name__}; export needs a teacher built by fewstep.models.loading.load_teacher."
    )


def student_adapter_name(student: Student) -> str:
    """The peft adapter that is the student (``default`` unless the student says otherwise)."""
    backbone = student.denoiser.backbone
    name = getattr(student, "adapter_name", "default")
    available = list(getattr(backbone, "peft_config", {}) or {})
    if name not in available:
        raise ValueError(f"The student's LoRA adapter {name!r} is not on its backbone; adapters found: {available}.")
    return name


def lora_state_dict(student: Student) -> dict[str, Any]:
    """The student's LoRA weights with peft keys (``...lora_A.weight``), adapter name stripped."""
    if not student.is_lora:
        raise ValueError("The student is a full fine-tune, not a LoRA: export it with save_merged (export.merged).")
    backbone = student.denoiser.backbone
    state = get_peft_model_state_dict(backbone, adapter_name=student_adapter_name(student))
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_lora(student: Student, teacher: Teacher, out_dir: str | Path, weight_name: str = WEIGHT_NAME) -> Path:
    """Write the student's LoRA as ``<out_dir>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``.

    Args:
        student: a LoRA student (``Student.lora``).
        teacher: the teacher it was trained on; its pipeline class writes the file.
        out_dir: the directory to write into (created).
        weight_name: the file name.

    Returns:
        The path of the written file.
    """
    pipe = _require_pipeline(teacher, "LoRA export")
    pipe_cls = type(pipe)
    if not hasattr(pipe_cls, "save_lora_weights"):
        raise ValueError(
            f"{pipe_cls.__name__} has no LoRA loader in diffusers, so a LoRA file could not be loaded with it. "
            "Export a merged pipeline instead (export.merged: true)."
        )
    backbone = student.denoiser.backbone
    state = lora_state_dict(student)
    metadata = backbone.peft_config[student_adapter_name(student)].to_dict()
    if isinstance(backbone, WanExperts):
        files = expert_lora_files(state, weight_name, getattr(student, "component", None))
    else:
        files = {weight_name: (backbone_component(teacher), state)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (component, part) in files.items():
        pipe_cls.save_lora_weights(
            out_dir,
            **{f"{component}_lora_layers": part, f"{component}_lora_adapter_metadata": metadata},
            weight_name=name,
            safe_serialization=True,
        )
    return out_dir / next(iter(files))


def expert_lora_files(
    state: dict[str, Any], weight_name: str, component: str | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Wan 2.2's LoRA (``WanExperts`` keys ``high.…`` / ``low.…``) as ``{file name: ("transformer", state)}``: one file
    per expert that carries weights, ``transformer``'s named ``weight_name``, ``transformer_2``'s
    ``TRANSFORMER_2_WEIGHT_NAME``; with ``component`` (one Phased DMD expert) only that one, named ``weight_name``.
    Both are written as ``transformer`` layers: ``load_into_transformer_2=True`` loads such a file into
    ``transformer_2``."""
    files = {}
    for name, expert in WAN_EXPERT_COMPONENTS.items():
        part = {k.removeprefix(f"{expert}."): v for k, v in state.items() if k.startswith(f"{expert}.")}
        if part and component in (None, name):
            own = weight_name if component is not None or name == "transformer" else TRANSFORMER_2_WEIGHT_NAME
            files[own] = ("transformer", part)
    if not files:
        raise ValueError(f"The Wan 2.2 student has no LoRA weights on {component or 'either expert'}.")
    return files


def merged_backbone(student: Student) -> nn.Module:
    """The student as plain weights: a copy of the backbone with the student's LoRA fused in (other adapters on the
    shared base are dropped; the copy is in ``eval()`` mode without grads), or the full student's own backbone as it
    is (not copied, not modified)."""
    backbone = student.denoiser.backbone
    if not student.is_lora:
        return backbone
    adapter = student_adapter_name(student)
    merged = copy.deepcopy(backbone)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if adapter in getattr(module, "lora_A", {}):
                module.merge(adapter_names=[adapter])  # W ← W + (α/r)·B·A
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    if hasattr(merged, "_hf_peft_config_loaded"):
        merged._hf_peft_config_loaded = False
    return merged.eval().requires_grad_(False)


def save_merged(
    student: Student, teacher: Teacher, out_dir: str | Path, scheduler: Any = None, guidance_scale: float | None = None
) -> Path:
    """Write a full diffusers pipeline with the student's weights (``save_pretrained``), loadable with
    ``DiffusionPipeline.from_pretrained(out_dir)``.

    Args:
        student: a LoRA or full student.
        teacher: its teacher; every other component (VAE, encoders, tokenizers) is copied from its pipeline.
        out_dir: the pipeline directory to write.
        scheduler: the student's diffusers scheduler (e.g. an ``LCMScheduler``); the teacher's when ``None``.
        guidance_scale: the student's guidance, for a pipeline that reads it from its ``guider`` component rather than
            a call argument (HunyuanVideo 1.5): the exported guider is the teacher's at this scale (1: no CFG).
    """
    pipe = _require_pipeline(teacher, "merged export")
    components = dict(pipe.components)
    merged = merged_backbone(student)
    if isinstance(merged, WanExperts):  # Wan 2.2: each expert into its own component
        components.update({name: getattr(merged, expert) for name, expert in WAN_EXPERT_COMPONENTS.items()})
    else:
        components[backbone_component(teacher)] = merged
    if scheduler is not None:
        components["scheduler"] = scheduler
    guider = components.get("guider")
    if guider is not None and guidance_scale is not None:
        components["guider"] = type(guider).from_config(guider.config, guidance_scale=float(guidance_scale))
    # Pipeline flags that are config, not components (requires_safety_checker, force_zeros_for_empty_prompt, ...).
    params = inspect.signature(type(pipe).__init__).parameters
    flags = {k: pipe.config[k] for k in params if k not in components and k in pipe.config}
    out = type(pipe)(**components, **flags)
    out_dir = Path(out_dir)
    out.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_student(student: Student, teacher: Teacher, out_dir: str | Path) -> Path:
    """Write ``student`` as a LoRA (``save_lora``) where the teacher's pipeline class loads LoRAs, otherwise (and for
    a full student) as a merged pipeline with the teacher's scheduler (``save_merged``).

    Returns:
        The LoRA file, or the pipeline directory.
    """
    pipe = _require_pipeline(teacher, "export")
    if student.is_lora and hasattr(type(pipe), "save_lora_weights"):
        return save_lora(student, teacher, out_dir)
    return save_merged(student, teacher, out_dir)


def _require_pipeline(teacher: Teacher, what: str) -> Any:
    if teacher.pipeline is None:
        raise ValueError(
            f"{what} writes diffusers files and needs a teacher loaded from a diffusers pipeline "
            "(fewstep.models.loading.load_teacher); this teacher is a custom module (Teacher.from_module). Save "
            "its weights with torch.save(student.state_dict(), path) instead."
        )
    return teacher.pipeline
