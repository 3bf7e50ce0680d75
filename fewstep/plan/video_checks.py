"""The recipe's clips against its teacher, checked by ``fewstep validate`` before anything loads: the teacher is
built from its configs alone (``fewstep.plan.meta.config_teacher``), so this check lives with the plan's config
readers, above the recipe checks of ``fewstep.config.checks``."""

from __future__ import annotations

from typing import Any

from fewstep.config.errors import RecipeIssue


def video_issues(recipe: Any, notes: list[str] | None = None) -> list[RecipeIssue]:
    """The recipe's clip shape against its teacher (``fewstep.data.video_folder.clip_shape_problems``): a frame count
    the video VAE cannot take, a resolution off the teacher's pixel multiple, ``data.num_frames`` on an image teacher.

    The teacher is built from its configs on the meta device (``fewstep.plan.meta.config_teacher``: a local pipeline
    directory, ``tiny:`` / ``fewstep:``, the configs shipped for well-known Hub ids or the local Hugging Face cache);
    nothing is checked when the recipe names no clip shape or this machine has no configs for the teacher, and then a
    recipe with ``data.num_frames`` gets a line in ``notes`` saying how to fetch the configs.
    """
    data = recipe.data
    if data.num_frames is None and (data.resolution is None or not _names_3d_backbone(recipe.teacher)):
        return []  # data.resolution alone follows a video rule only for a video teacher
    from fewstep.data.video_folder import clip_shape_problems  # lazy: torch and diffusers
    from fewstep.plan.meta import config_teacher

    pretrained = recipe.teacher.pretrained
    teacher = config_teacher(pretrained, recipe.teacher.revision)
    if teacher is None:
        if notes is not None and data.num_frames is not None:
            notes.append(
                f"data.num_frames was not checked against the teacher: no configs for {pretrained!r} on this machine. "
                f"Fetch them once to check it here (`huggingface-cli download {pretrained} --include '*.json'`); "
                "training checks it when the teacher loads."
            )
        return []
    return [RecipeIssue(("data", key), problem) for key, problem in clip_shape_problems(data, teacher)]


def _names_3d_backbone(teacher: Any) -> bool:
    """Whether the teacher's ``model_index.json`` names a 3-D backbone (diffusers' video models are
    ``...Transformer3DModel``), read as JSON alone: an image recipe's ``data.resolution`` then costs no pipeline build
    (importing diffusers' pipelines takes seconds). ``False`` when this machine has no configs for the teacher."""
    import json

    from fewstep.plan.sources import INDEX, config_directory

    try:
        directory, _ = config_directory(teacher.pretrained, teacher.revision)
        index = json.loads((directory / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return any(isinstance(v, list) and len(v) == 2 and str(v[1]).endswith("3DModel") for v in index.values())
