"""Pair generation for a recipe: the recipe's teacher, its ``data.path`` as the pair directory, and conditions drawn
per shard (class labels for class-conditional teachers, prompts from a list for text teachers).

``fewstep pairs <recipe> --num-pairs N [--steps 25] [--guidance W] [--prompts FILE]
[key=value ...]``
(or ``accelerate launch -m fewstep pairs ...``: every rank writes its own shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep.data.reflow.pairs import ConditionFn, generate_pairs
from fewstep.models.backbones import latent_shape, num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.teacher import Teacher
from fewstep.solvers.grids import sampling_taus

TEXT_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "sd35", "qwen_image")


def class_conditions(teacher: Teacher) -> ConditionFn:
    """Uniform class labels ``0 .. null − 1`` (the null class is the last embedding) from the shard generator."""
    null = int(teacher.null_cond.class_labels[0])

    def conditions(index: int, n: int, gen: torch.Generator) -> tuple[Conditioning, Conditioning | None]:
        cond = Conditioning(class_labels=torch.randint(0, null, (n,), generator=gen))
        return cond, teacher.uncond_like(cond)

    return conditions


def prompt_conditions(teacher: Teacher, prompts: list[str], resolution: int | None = None) -> ConditionFn:
    """A prompt per pair drawn uniformly from ``prompts`` with the shard generator, encoded by the teacher's own
    encoders (each distinct prompt once)."""
    from fewstep.data.loader import PromptCache

    if not prompts:
        raise ValueError("Pair generation for a text-to-image teacher needs prompts: pass --prompts FILE (one a line).")
    cache = PromptCache(teacher, resolution)

    def conditions(index: int, n: int, gen: torch.Generator) -> tuple[Conditioning, Conditioning | None]:
        picks = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
        return cache([prompts[i] for i in picks], "cpu")

    return conditions


def conditions_for(teacher: Teacher, prompts: list[str] | None, resolution: int | None) -> ConditionFn | None:
    """The condition source that fits the teacher: prompts (text families), classes, or none (unconditional)."""
    if teacher.family in TEXT_FAMILIES:
        return prompt_conditions(teacher, prompts or [], resolution)
    if teacher.null_cond is not None and teacher.null_cond.class_labels is not None:
        return class_conditions(teacher)
    return None


def pairs_for_recipe(
    recipe: Any,
    num_pairs: int,
    num_steps: int = 25,
    guidance_scale: float | None = None,
    prompts: list[str] | None = None,
    shard_size: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    out_dir: str | Path | None = None,
    accelerator: Any = None,
    teacher: Teacher | None = None,
    progress: bool = True,
) -> Path:
    """Generate the pairs a reflow / InstaFlow recipe trains on, into its ``data.path``.

    Args:
        recipe: a validated recipe with ``data.source: pairs``.
        num_pairs: total pairs.
        num_steps: teacher ODE steps (rfpp: 18 Heun ≈ 35 NFE on CIFAR; 25+ Euler for latent T2I).
        guidance_scale: CFG ``w`` baked into the pairs (default ``recipe.teacher.guidance_scale``).
        prompts: prompts for text-to-image teachers.
        shard_size, batch_size, seed, accelerator, progress: see ``generate_pairs``.
        out_dir: overrides ``recipe.data.path``.
        teacher: a ready teacher instead of loading ``recipe.teacher``.
    """
    if teacher is None:
        from fewstep.models.loading import load_teacher

        teacher = load_teacher(recipe.teacher)
    if accelerator is not None:
        teacher.denoiser.to(accelerator.device)
    out = out_dir or recipe.data.path
    if out is None:
        raise ValueError("No output directory: set data.path (data.source: pairs) or pass out_dir.")
    shape = _sample_shape(teacher, recipe)
    w = recipe.teacher.guidance_scale if guidance_scale is None else guidance_scale
    taus = sampling_taus(teacher.schedule, num_steps, num_tokens(teacher.denoiser, (1, *shape)))  # the teacher's grid
    return generate_pairs(
        teacher, out, shape, num_pairs, taus,
        conditions_for(teacher, prompts, getattr(recipe.data, "resolution", None)), w, shard_size, batch_size,
        seed, accelerator, progress, extra_settings={"teacher": recipe.teacher.pretrained},
    )  # fmt: skip


def _sample_shape(teacher: Teacher, recipe: Any) -> tuple[int, ...]:
    return tuple(latent_shape(teacher, 1, getattr(recipe.data, "resolution", None))[1:])
