"""The model card (``README.md``) of an exported student: what it is, the guidance convention, the recommended steps
and guidance, the exact schedules it was trained for, how to load it in diffusers, and an optional eval table."""

from __future__ import annotations

from pathlib import Path

from fewstep.export.lora import WEIGHT_NAME
from fewstep.objectives.spec import SamplingSpec


def _fmt(value: object) -> str:
    """Floats with 8 significant digits: enough to round-trip the float32 sigmas a scheduler casts them to."""
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value)


def _snippet(spec: SamplingSpec, pipeline_class: str, base_model: str, student_path: str, lora: bool) -> str:
    kwargs = spec.call_kwargs(spec.recommended_steps)
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in kwargs.items())
    seeded = "sigmas" in kwargs  # pipelines that sample these schedulers draw re-noise from the global RNG
    lines = ["import torch", f"from diffusers import {pipeline_class}, {spec.scheduler_class}", ""]
    if lora:
        lines += [
            f'pipe = {pipeline_class}.from_pretrained("{base_model}")',
            f'pipe.scheduler = {spec.scheduler_class}.from_pretrained("{student_path}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{student_path}", weight_name="{WEIGHT_NAME}")',
        ]
    else:
        lines += [f'pipe = {pipeline_class}.from_pretrained("{student_path}")  # scheduler included']
    if seeded:
        lines += ["torch.manual_seed(0)"]
        lines += [f'image = pipe("a photo of a cat", {args}).images[0]']
    else:
        lines += [
            f'image = pipe("a photo of a cat", {args},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
        ]
    return "\n".join(lines)


def _source_line(source: dict[str, str]) -> str:
    weights = {"ema": "the EMA of the trained weights (`train.ema_decay`)", "raw": "the trained (raw) weights"}
    what = weights.get(source.get("weights", ""), f"{source.get('weights')} weights")
    return (
        f"Weights: {what} of checkpoint `{Path(source.get('checkpoint', '?')).name}` of the training run "
        f"`{source.get('run', '?')}`."
    )


def render_card(
    spec: SamplingSpec,
    *,
    pipeline_class: str,
    base_model: str,
    student_path: str,
    lora: bool,
    merged_path: str | None = None,
    description: str = "",
    metrics: dict[str, dict[int, float]] | None = None,
    source: dict[str, str] | None = None,
) -> str:
    """The card as Markdown with a YAML header.

    Args:
        spec: the student's sampling spec (``objective.sampling_spec()``).
        pipeline_class: the diffusers pipeline class to load with (e.g. ``StableDiffusionPipeline``).
        base_model: the teacher (hub id or path) the LoRA applies to.
        student_path: where this export lives (a folder or the Hub id it will be uploaded to).
        lora: whether ``pytorch_lora_weights.safetensors`` is part of the export.
        merged_path: the merged pipeline folder, if one was written.
        description: free text from the recipe.
        metrics: optional eval table, ``{metric: {num_steps: value}}``.
        source: where the weights came from, ``{"run", "checkpoint", "weights"}`` (``weights``: ``ema`` or ``raw``).
    """
    kind = "LoRA" if lora else "full model"
    tags = ["fewstep", "diffusers", spec.objective, "few-step", *(["lora"] if lora else [])]
    out = ["---", "library_name: diffusers", f"base_model: {base_model}", "tags:", *[f"- {t}" for t in tags], "---", ""]
    out += [f"# Few-step student ({spec.objective}, {kind})", ""]
    if description:
        out += [description, ""]
    out += [f"Distilled from `{base_model}` with fewstep (objective `{spec.objective}`).", ""]
    if source is not None:
        out += [_source_line(source), ""]
    out += [
        "## Recommended settings",
        "",
        f"* steps: **{spec.recommended_steps}** (exported: {', '.join(str(s) for s in sorted(spec.steps))})",
        f"* guidance_scale: **{spec.guidance_scale}**",
        f"* guidance convention: {spec.guidance_convention}",
        f"* scheduler: `{spec.scheduler_class}` (config in `scheduler/`; exact schedules in `fewstep_student.json`)",
        "",
        "## Load in diffusers",
        "",
        "```python",
        _snippet(spec, pipeline_class, base_model, student_path, lora),
        "```",
        "",
    ]
    if lora and merged_path is not None:
        out += [
            f"The same student with the LoRA fused in is a full pipeline in `{merged_path}`:",
            "",
            "```python",
            _snippet(spec, pipeline_class, base_model, merged_path, False),
            "```",
            "",
        ]
    out += ["## Schedules as trained", "", "| steps | pipeline arguments |", "|---|---|"]
    for n in sorted(spec.steps):
        entry = ", ".join(f"{k}={[round(v, 6) for v in vals]}" for k, vals in spec.steps[n].items())
        out.append(f"| {n} | {entry} |")
    out.append("")
    if spec.notes:
        out += ["## Notes", "", *[f"* {note}" for note in spec.notes], ""]
    if metrics:
        steps = sorted({s for row in metrics.values() for s in row})
        out += [
            "## Evaluation",
            "",
            "| metric | " + " | ".join(f"{s} steps" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for name, row in metrics.items():
            out.append(f"| {name} | " + " | ".join(f"{row[s]:.4g}" if s in row else "–" for s in steps) + " |")
        out.append("")
    return "\n".join(out)


def write_card(out_dir: str | Path, spec: SamplingSpec, **kwargs) -> Path:
    """Write ``<out_dir>/README.md`` (see ``render_card`` for the arguments)."""
    path = Path(out_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(spec, **kwargs))
    return path
