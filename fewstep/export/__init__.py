"""Export students so stock diffusers loads them: LoRA, merged pipeline, scheduler config, model card."""

from fewstep.export.card import render_card, write_card
from fewstep.export.hub import PushError, push_export
from fewstep.export.kohya import (
    KOHYA_TRANSFORMER_2_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    kohya_files,
    kohya_state_dict,
    save_kohya,
)
from fewstep.export.lora import (
    TRANSFORMER_2_WEIGHT_NAME,
    WEIGHT_NAME,
    lora_state_dict,
    merged_backbone,
    save_lora,
    save_merged,
)
from fewstep.export.run import export_run, export_student, read_source, sampling_spec
from fewstep.objectives.spec import SamplingSpec, read_schedule, write_schedule

__all__ = [
    "KOHYA_TRANSFORMER_2_WEIGHT_NAME",
    "KOHYA_WEIGHT_NAME",
    "PushError",
    "WEIGHT_NAME",
    "SamplingSpec",
    "TRANSFORMER_2_WEIGHT_NAME",
    "export_run",
    "export_student",
    "kohya_files",
    "kohya_state_dict",
    "lora_state_dict",
    "merged_backbone",
    "push_export",
    "read_schedule",
    "read_source",
    "render_card",
    "sampling_spec",
    "save_kohya",
    "save_lora",
    "save_merged",
    "write_card",
    "write_schedule",
]
