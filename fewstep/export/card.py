"""The model card (``README.md``) of an exported student: what it is, the base model, the guidance convention, the
recommended steps and guidance, the exact schedules it was trained for, how to load it in diffusers (a snippet that
runs as pasted), and the evaluation table when one was made for these weights.

The YAML header is written with ``huggingface_hub.ModelCardData``. Its ``base_model`` is only set to a Hub id: the Hub
refuses a card whose ``base_model`` is a local path, so a student of a local or ``tiny:`` / ``fewstep:`` model names
its base (as the real local directory) in the text and the snippet only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fewstep.export.kohya import KOHYA_TRANSFORMER_2_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from fewstep.export.lora import TRANSFORMER_2_WEIGHT_NAME, WEIGHT_NAME
from fewstep.models.loading import is_hub_id, resolve_pretrained
from fewstep.objectives.spec import SamplingSpec

PROMPT = "a photo of a cat"
FIRST_FRAME = "first_frame.png"  # image-to-video pipelines (WanImageToVideoPipeline): the clip's first frame


class Usage(NamedTuple):
    """How the stock pipeline is loaded and called (see ``render_card``)."""

    pipeline_class: str
    base_model: str
    conditioning: str
    sample_shape: Sequence[int]
    null_class: int | None
    lora_2: bool = False


def card_base_model(spec: str) -> str:
    """What ``from_pretrained`` takes for a base model: a Hub id as it is; ``tiny:`` / ``fewstep:`` names and local
    paths as the absolute local directory."""
    resolved = resolve_pretrained(spec)
    return resolved if is_hub_id(resolved) else str(Path(resolved).resolve())


def _fmt(value: object) -> str:
    """Floats with 8 significant digits: enough to round-trip the float32 sigmas a scheduler casts them to."""
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value)


def _args(kwargs: dict[str, object]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in kwargs.items())


def _load_pipeline(pipeline_class: str, where: str, subfolder: str | None, note: str) -> list[str]:
    """``pipe = <class>.from_pretrained(...)`` for a full pipeline in ``where`` (a directory or Hub id), or in its
    ``subfolder`` (a pipeline in a Hub repo's subfolder is downloaded first: ``from_pretrained`` takes no subfolder
    for pipelines)."""
    if subfolder is None:
        return [f'pipe = {pipeline_class}.from_pretrained("{where}")  # {note}']
    return [
        "from huggingface_hub import snapshot_download",
        "",
        f'folder = snapshot_download("{where}", allow_patterns=["{subfolder}/*"])',
        f'pipe = {pipeline_class}.from_pretrained(f"{{folder}}/{subfolder}")  # {note}',
    ]


def _text_snippet(
    spec: SamplingSpec, pipeline_class: str, base_model: str, student_path: str, subfolder: str | None, lora: bool,
    lora_2: bool = False,
) -> list[str]:  # fmt: skip
    """A text-to-image (or text-to-video) pipeline: the LoRA on its base with the student's scheduler, or the full
    pipeline. A pipeline that takes no ``sigmas=`` (WanPipeline, LTXPipeline) runs its scheduler's own grid: a student
    exported for that (``fewstep.objectives.pipeline_grid``: ``num_inference_steps`` and no ``sigmas``) is sampled at
    its recommended steps; one whose spec still needs ``sigmas=`` reproduces at one step only, so the snippet samples
    one step and says how to sample more. An image-to-video pipeline (``takes_first_frame``) is called with its first
    frame, ``pipe(image=..., prompt=...)``. A pipeline that guides through its ``guider`` component (no
    ``guidance_scale`` argument) is called without one: the exported pipeline's guider carries the student's."""
    call = _pipeline_call_parameters(pipeline_class)
    first_frame = takes_first_frame(pipeline_class)
    kwargs = spec.call_kwargs(spec.recommended_steps)
    lines = ["import torch", f"from diffusers import {pipeline_class}, {spec.scheduler_class}", ""]
    if "sigmas" in kwargs and call is not None and "sigmas" not in call and 1 in spec.steps:
        kwargs = {k: v for k, v in spec.call_kwargs(1).items() if k != "sigmas"} | {"num_inference_steps": 1}
        lines.insert(0, f"# {pipeline_class} takes no sigmas=, so it runs the student's schedule at one step only; for "
                     f"{spec.recommended_steps} steps use `fewstep sample`.")  # fmt: skip
    if call is not None and "guidance_scale" not in call:  # its guider component holds the scale (HunyuanVideo 1.5)
        kwargs = {k: v for k, v in kwargs.items() if k != "guidance_scale"}
    output = "frames" if call is not None and "num_frames" in call else "images"
    result = "video" if output == "frames" else "image"
    if lora:
        lines += [
            f'pipe = {pipeline_class}.from_pretrained("{base_model}")',
            f'pipe.scheduler = {spec.scheduler_class}.from_pretrained("{student_path}", subfolder="scheduler")',
            f'pipe.load_lora_weights("{student_path}", weight_name="{WEIGHT_NAME}")',
        ]
        if lora_2:  # Wan 2.2: the low-noise expert's LoRA
            lines += [f'pipe.load_lora_weights("{student_path}", weight_name="{TRANSFORMER_2_WEIGHT_NAME}", '
                      "load_into_transformer_2=True)"]  # fmt: skip
    else:
        lines += _load_pipeline(pipeline_class, student_path, subfolder, "scheduler included")
    inputs = f'"{PROMPT}"'
    if first_frame:
        after = lines.index(f"from diffusers import {pipeline_class}, {spec.scheduler_class}") + 1
        lines.insert(after, "from diffusers.utils import load_image")
        lines += [f'image = load_image("{FIRST_FRAME}")  # the first frame of the clip to generate',
                  f"# {pipeline_class} cleans prompts with ftfy (pip install ftfy)"]  # fmt: skip
        inputs = f'image=image, prompt="{PROMPT}"'
    renoised = spec.scheduler_config.get("stochastic_sampling") and kwargs.get("num_inference_steps", 1) > 1
    if "sigmas" in kwargs or renoised:  # pipelines that sample these schedulers draw re-noise from the global RNG
        return [*lines, "torch.manual_seed(0)", f"{result} = pipe({inputs}, {_args(kwargs)}).{output}[0]"]
    return [
        *lines,
        f"{result} = pipe({inputs}, {_args(kwargs)},",
        f"{' ' * (len(result) + 8)}generator=torch.Generator().manual_seed(0)).{output}[0]",
    ]


def takes_first_frame(pipeline_class: str) -> bool:
    """Whether a diffusers pipeline generates from a first frame: its ``__call__`` takes ``image`` and
    ``num_frames`` (``WanImageToVideoPipeline``)."""
    call = _pipeline_call_parameters(pipeline_class)
    return call is not None and {"image", "num_frames"} <= call


def _pipeline_call_parameters(pipeline_class: str) -> set[str] | None:
    """The keyword names ``pipeline_class.__call__`` takes (None: not a diffusers class here)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    return set(inspect.signature(cls.__call__).parameters) if cls is not None else None


def _pixel_snippet(
    spec: SamplingSpec,
    pipeline_class: str,
    student_path: str,
    subfolder: str | None,
    sample_shape: Sequence[int],
    null_class: int | None,
) -> list[str]:
    """A pixel ``UNet2DModel`` pipeline: the sampling loop written out, because ``DDPMPipeline`` can pass neither
    class labels nor a schedule (timesteps, sigmas) to its model and scheduler."""
    kwargs = spec.call_kwargs(spec.recommended_steps)
    w = float(kwargs.pop("guidance_scale"))
    step_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("num_inference_steps", "timesteps", "sigmas")}
    n = null_class if null_class is not None else 4  # one image per class, or four unconditional images
    shape = ", ".join(str(d) for d in (n, *sample_shape))
    lines = [
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        *_load_pipeline(pipeline_class, student_path, subfolder, f"the student's {spec.scheduler_class} included"),
        "scheduler, unet = pipe.scheduler, pipe.unet",
        f"scheduler.set_timesteps({_args(kwargs)})",
        "generator = torch.Generator().manual_seed(0)",
        f"x = torch.randn({shape}, generator=generator) * scheduler.init_noise_sigma",
    ]
    if null_class is not None:
        lines.append(f"labels = torch.arange({null_class})  # class {null_class} is the null class")
    call = "unet(x_in, t, class_labels=labels).sample" if null_class is not None else "unet(x_in, t).sample"
    lines += ["with torch.no_grad():", "    for t in scheduler.timesteps:"]
    lines += ["        x_in = scheduler.scale_model_input(x, t)"]
    if null_class is not None and w != 1.0:  # CFG on a doubled batch: uncond + w·(cond − uncond)
        lines += [
            f"        null = torch.full_like(labels, {null_class})",
            "        both = unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([null, labels])).sample",
            "        uncond, cond = both.chunk(2)",
            f"        out = uncond + {_fmt(w)} * (cond - uncond)",
        ]
    else:
        lines.append(f"        out = {call}")
    extra = "".join(f", {k}={_fmt(v)}" for k, v in step_kwargs.items())
    lines += [
        f"        x = scheduler.step(out, t, x, generator=generator{extra}).prev_sample",
        f"images = (x / 2 + 0.5).clamp(0, 1)  # [{shape}] in [0, 1]",
    ]
    return lines


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
    kohya: bool = False,
    description: str = "",
    evaluation: str | None = None,
    source: dict[str, str] | None = None,
    conditioning: str = "text",
    sample_shape: Sequence[int] = (),
    null_class: int | None = None,
    lora_2: bool = False,
) -> str:
    """The card as Markdown with a YAML header.

    Args:
        spec: the student's sampling spec (``objective.sampling_spec()``).
        pipeline_class: the diffusers pipeline class to load with (e.g. ``StableDiffusionPipeline``).
        base_model: the teacher the student was distilled from, as ``from_pretrained`` takes it (``card_base_model``).
        student_path: where this export is loaded from: its directory, or the Hub id it is uploaded to.
        lora: whether ``pytorch_lora_weights.safetensors`` is part of the export.
        merged_path: the merged pipeline's folder next to a LoRA (``merged``), if one was written.
        kohya: whether ``pytorch_lora_weights_kohya.safetensors`` (ComfyUI / kohya keys) is part of the export (with
            ``lora_2`` also ``pytorch_lora_weights_kohya_transformer_2.safetensors``).
        description: free text from the recipe.
        evaluation: the evaluation section (Markdown: provenance and table), e.g. ``fewstep.eval.card``'s.
        source: where the weights came from, ``{"run", "checkpoint", "weights"}`` (``weights``: ``ema`` or ``raw``).
        conditioning: ``text`` (text-to-image pipelines), ``class`` or ``none`` (pixel ``UNet2DModel`` pipelines).
        sample_shape: ``[c, h, w]`` of one sample of a pixel pipeline.
        null_class: the null class of a class-conditional pixel pipeline (its classes are ``0 .. null_class - 1``).
        lora_2: whether ``pytorch_lora_weights_transformer_2.safetensors`` (Wan 2.2's ``transformer_2``) is part of it.
    """
    from huggingface_hub import ModelCardData

    kind = "LoRA" if lora else "full model"
    tags = ["fewstep", "diffusers", spec.objective, "few-step", *(["lora"] if lora else [])]
    header = ModelCardData(
        library_name="diffusers", base_model=base_model if is_hub_id(base_model) else None, tags=tags,
        pipeline_tag=("image-to-video" if takes_first_frame(pipeline_class) else "text-to-image")
        if conditioning == "text" else None,
    )  # fmt: skip
    out = ["---", header.to_yaml(), "---", "", f"# Few-step student ({spec.objective}, {kind})", ""]
    if description:
        out += [description, ""]
    out += [f"Distilled from `{base_model}` with fewstep (objective `{spec.objective}`).", ""]
    if source is not None:
        out += [_source_line(source), ""]
    out += [
        "## Recommended settings",
        "",
        f"* base model: `{base_model}`",
        f"* steps: **{spec.recommended_steps}** (exported: {', '.join(str(s) for s in sorted(spec.steps))})",
        f"* guidance_scale: **{spec.guidance_scale}**",
        f"* guidance convention: {spec.guidance_convention}",
        f"* scheduler: `{spec.scheduler_class}` (config in `scheduler/`; exact schedules in `fewstep_student.json`)",
        "",
        "## Load in diffusers",
        "",
    ]
    if lora and not is_hub_id(base_model):
        out += [f"`{base_model}` is a local directory of the machine that exported this student: point it at your "
                "copy of the base model.", ""]  # fmt: skip
    usage = Usage(pipeline_class, base_model, conditioning, sample_shape, null_class, lora_2)
    out += ["```python", *_snippet(spec, usage, student_path, None, lora), "```", ""]
    if lora and merged_path is not None:
        hub = is_hub_id(student_path)  # a Hub repo: the pipeline is in its subfolder
        where, subfolder = (student_path, merged_path) if hub else (str(Path(student_path) / merged_path), None)
        out += [
            f"The same student with the LoRA fused in is a full pipeline in `{merged_path}/`:",
            "",
            "```python",
            *_snippet(spec, usage, where, subfolder, False),
            "```",
            "",
        ]
    if kohya:
        out += [f"`{KOHYA_WEIGHT_NAME}` is the same LoRA in the layout ComfyUI (Load LoRA) reads (for SD and FLUX.1 "
                "also A1111 / Forge and kohya's sd-scripts); `pipe.load_lora_weights` reads it too."
                + (f" `{KOHYA_TRANSFORMER_2_WEIGHT_NAME}` is `transformer_2`'s (the low-noise expert's model in "
                   "ComfyUI; `load_into_transformer_2=True` in diffusers)." if lora_2 else ""), ""]  # fmt: skip
    out += ["## Schedules as trained", "", "| steps | pipeline arguments |", "|---|---|"]
    for n in sorted(spec.steps):
        entry = ", ".join(f"{k}={[round(v, 6) for v in vals]}" for k, vals in spec.steps[n].items())
        out.append(f"| {n} | {entry} |")
    out.append("")
    if spec.notes:
        out += ["## Notes", "", *[f"* {note}" for note in spec.notes], ""]
    if evaluation:
        out += ["## Evaluation", "", evaluation.strip(), ""]
    return "\n".join(out)


def _snippet(spec: SamplingSpec, usage: Usage, student_path: str, subfolder: str | None, lora: bool) -> list[str]:
    """The loading and sampling code for a text pipeline or a pixel ``UNet2DModel`` pipeline."""
    if usage.conditioning == "text":
        return _text_snippet(spec, usage.pipeline_class, usage.base_model, student_path, subfolder, lora, usage.lora_2)
    return _pixel_snippet(spec, usage.pipeline_class, student_path, subfolder, usage.sample_shape, usage.null_class)


def write_card(out_dir: str | Path, spec: SamplingSpec, **kwargs) -> Path:
    """Write ``<out_dir>/README.md`` (see ``render_card`` for the arguments)."""
    path = Path(out_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(spec, **kwargs), encoding="utf-8")
    return path
