"""Checks across a validated recipe's blocks, so that a recipe that cannot train is refused before training starts.

* ``recipe_issues``: what needs no file and no model: ``tiny:`` / ``fewstep:`` names the loaders know, step counts
  the objective's sampler can take, a reward for a reward weight. ``validate_recipe`` runs them on every recipe.
* ``input_issues``: what this machine must hold: the teacher directory, ``data.path``, a ``train.resume`` path, an
  ``output_dir`` that can be a directory (with a hint on how to get missing data), and the packages of the
  ``train.log_with`` trackers. ``fewstep validate`` runs them, and so do ``fewstep train`` and
  ``fewstep.train.loop.train`` before any model loads (a run directory's recipe is also read back by export and eval,
  where the training data need not exist any more).

The recipe's clips against its teacher's video VAE and backbone are checked from the teacher's configs by
``fewstep.plan.video_checks.video_issues`` (it builds the teacher on the meta device, a plan-layer tool).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fewstep.config.errors import RecipeIssue, did_you_mean

_PATH_SOURCES = {  # data.source -> (what data.path must be, a file inside it that must exist)
    "tensors": ("file", None),
    "prompts": ("file", None),
    "image_folder": ("dir", "metadata.jsonl"),
    "pairs": ("dir", "pairs.json"),
    "fashion_mnist": ("dir", None),
    "cache": ("dir", "manifest.json"),
}
_RESUME_WORDS = ("auto", "never")
TRACKER_PACKAGES = {  # accelerate tracker name (train.log_with) -> the pip package that provides it
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "aim": "aim",
    "comet_ml": "comet-ml",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def recipe_issues(recipe: Any) -> list[RecipeIssue]:
    """Problems of a validated recipe that need neither files nor models (an empty list when there are none)."""
    issues = _teacher_name_issues(recipe.teacher.pretrained)
    grid = getattr(recipe.objective, "num_ddim_timesteps", None)
    if isinstance(grid, int):  # LCM / PCM samplers pick their levels from this skipping grid
        used = []
        if recipe.train.sample_every is not None:
            used.append((("train", "sample_steps"), recipe.train.sample_steps))
        if recipe.eval.every_steps is not None:
            used.append((("eval", "steps"), recipe.eval.steps))
        for loc, steps in used:
            for i, n in enumerate(steps):
                if n > grid:
                    issues.append(
                        RecipeIssue(
                            (*loc, i),
                            f"is more steps than the objective's skipping grid has intervals "
                            f"(objective.num_ddim_timesteps={grid})",
                            n,
                            hint=f"Use step counts of at most {grid}, or raise objective.num_ddim_timesteps.",
                        )
                    )
    if recipe.data.source == "cache" and recipe.eval.every_steps is not None:
        issues.append(
            RecipeIssue(
                ("eval", "every_steps"),
                "cannot be used with data.source: cache (periodic evaluation encodes its prompts with the text "
                "encoders, which training from a cache leaves on disk)",
                recipe.eval.every_steps,
                hint="Remove eval.every_steps and evaluate the run afterwards (`fewstep eval RUN --prompts FILE`), or "
                "train from the source data.",
            )
        )
    fsdp = recipe.train.fsdp
    if fsdp is not None and fsdp.enabled and recipe.eval.every_steps is not None:
        issues.append(
            RecipeIssue(
                ("eval", "every_steps"),
                "cannot be used with train.fsdp (periodic evaluation runs on the main process alone, and sharded "
                "weights need every process in each forward)",
                recipe.eval.every_steps,
                hint="Remove eval.every_steps and evaluate the checkpoints afterwards (`fewstep eval RUN --checkpoint "
                "step_XXXXXXXX` reads a sharded checkpoint whole).",
            )
        )
    if getattr(recipe.objective, "reward_weight", 0) > 0 and getattr(recipe.objective, "reward", "") is None:
        issues.append(
            RecipeIssue(
                ("objective", "reward"),
                f"required when objective.reward_weight > 0 (it is {recipe.objective.reward_weight})",
                allowed="custom:<module>:<function>",
                hint="Name the reward function, or set objective.reward_weight: 0.",
            )
        )
    return issues


def _teacher_name_issues(pretrained: str) -> list[RecipeIssue]:
    loc = ("teacher", "pretrained")
    if pretrained.startswith("tiny:"):
        from fewstep.testing.zoo import FAMILIES

        if pretrained.removeprefix("tiny:") not in FAMILIES:
            names = [f"tiny:{f}" for f in FAMILIES]
            hint = did_you_mean(pretrained, names) or "Pick one of the tiny test pipelines."
            return [RecipeIssue(loc, "unknown tiny model family", pretrained, ", ".join(names), hint)]
    elif pretrained.startswith("fewstep:"):
        from fewstep.assets import asset_names

        key = pretrained.removeprefix("fewstep:").strip().lower().replace("_", "-")
        if key not in asset_names():
            names = [f"fewstep:{a}" for a in asset_names()]
            hint = did_you_mean(pretrained, names) or "Pick one of the shipped assets."
            return [RecipeIssue(loc, "unknown fewstep asset", pretrained, ", ".join(names), hint)]
    return []


def input_issues(recipe: Any, name: str | None = None, teacher: bool = True) -> list[RecipeIssue]:
    """Files and directories the recipe names that are missing or of the wrong kind on this machine.

    Args:
        recipe: a validated recipe.
        name: how the user named the recipe, with its overrides (``lcm/sd15_lcm_lora data.resolution=256``), for the
            ``fewstep data ...`` command in hints.
        teacher: also check a local ``teacher.pretrained`` directory (not when a ready teacher object is used).
    """
    issues = _teacher_path_issues(recipe.teacher.pretrained) if teacher else []
    issues += _data_path_issues(recipe.data, name or "RECIPE")
    resume = recipe.train.resume
    if resume not in _RESUME_WORDS and not Path(resume).expanduser().is_dir():
        issues.append(
            RecipeIssue(
                ("train", "resume"),
                "is neither auto, never nor an existing checkpoint directory",
                resume,
                "auto, never, or a <run>/checkpoints/step_XXXXXXXX directory",
            )
        )
    issues += _output_dir_issues(recipe.output_dir)
    issues += tracker_issues(recipe.train.log_with)
    return issues


def tracker_issues(names: list[str]) -> list[RecipeIssue]:
    """An issue per ``train.log_with`` tracker that cannot start here: its package is not installed (accelerate's
    ``is_<name>_available``), or the installed accelerate does not know it. accelerate itself would only skip it."""
    import accelerate
    import accelerate.utils

    issues = []
    for i, name in enumerate(names):
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is None:
            issues.append(
                RecipeIssue(("train", "log_with", i), f"is not a tracker of accelerate {accelerate.__version__}", name,
                            hint="Upgrade accelerate (pip install -U accelerate) or remove it from train.log_with.")
            )  # fmt: skip
        elif not available():
            package = TRACKER_PACKAGES.get(name, name)
            extra = " (or pip install 'fewstep[wandb]')" if name == "wandb" else ""
            issues.append(
                RecipeIssue(("train", "log_with", i), "is not installed", name,
                            hint=f"Install it with pip install {package}{extra}, or remove it from train.log_with.")
            )  # fmt: skip
    return issues


def _data_path_issues(data: Any, name: str) -> list[RecipeIssue]:
    """``data.path`` of the sources that read one: present, of the right kind, with its index file; the hint says how
    to get the data (``fewstep data`` writes a starter set, ``fewstep pairs`` the reflow pairs)."""
    if data.source == "webdataset" and data.path is not None:
        return _shard_issues(data.path)
    if data.path is None or data.source not in _PATH_SOURCES:
        return []
    kind, inside = _PATH_SOURCES[data.source]
    path = Path(data.path).expanduser()
    if not (path.is_file() if kind == "file" else path.is_dir()):
        other = "a directory" if kind == "file" else "a file"
        what = f"is {other}" if path.exists() else "does not exist"
        problem = f"{what}; data.source: {data.source} reads a {kind if kind == 'file' else 'directory'}"
    elif inside is not None and not (path / inside).is_file():
        problem = f"has no {inside}"
    else:
        return []
    return [RecipeIssue(("data", "path"), problem, data.path, hint=_get_data_hint(data.source, name))]


def _shard_issues(path: str | list[str]) -> list[RecipeIssue]:
    """The webdataset package is installed and ``data.path`` names existing local shards."""
    from fewstep.data.shards import INSTALL_HINT, list_shards

    try:
        list_shards(path)
    except ImportError:
        return [RecipeIssue(("data", "source"), "needs the webdataset package, which is not installed", "webdataset",
                            hint=f"Install it: {INSTALL_HINT}.")]  # fmt: skip
    except (OSError, ValueError) as err:
        hint = (
            "Point data.path at .tar shards, or write them from an image folder with `fewstep data RECIPE "
            "--to-shards DIR` (a recipe whose data.source is image_folder)."
        )
        return [RecipeIssue(("data", "path"), str(err).removeprefix("data.path ").rstrip("."), path, hint=hint)]
    return []


def _get_data_hint(source: str, name: str) -> str:
    """How to get the data a source reads."""
    if source == "image_folder":
        return (
            "Point data.path at a folder of images with a metadata.jsonl (one line per image: "
            '{"file_name": "0001.png", "text": "its caption"}), or draw a starter folder from the teacher: '
            f"`fewstep data {name} --num-images 64`."
        )
    if source == "prompts":
        return (
            "Point data.path at a text file with one prompt a line, list them under data.prompts, or write a starter "
            f"set: `fewstep data {name}`."
        )
    if source == "pairs":
        return f"Write the pairs first: `fewstep pairs {name} --num-pairs N --prompts FILE`."
    if source == "cache":
        return (
            "Write the cache first from the recipe's image folder or prompts: `fewstep cache RECIPE --out DIR` "
            "(with data.source: image_folder or prompts), then set data.path to DIR."
        )
    if source == "fashion_mnist":
        return (
            "Point data.path at the directory of the Fashion-MNIST idx files (`apt-get install dataset-fashion-mnist` "
            "fills /usr/share/datasets/fashion-mnist)."
        )
    return "Point data.path at a safetensors file holding x0 (and optionally class_labels)."


def _teacher_path_issues(pretrained: str) -> list[RecipeIssue]:
    if pretrained.startswith(("tiny:", "fewstep:")):
        return []
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1 or path.exists()
    if not looks_local:
        return []  # a Hub id (owner/name): resolved when the teacher loads
    loc = ("teacher", "pretrained")
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        return [
            RecipeIssue(
                loc,
                f"{what}; a local teacher is a diffusers pipeline directory",
                pretrained,
                hint="Give the directory written by pipe.save_pretrained(dir), a Hub id or tiny:<family>.",
            )
        ]
    if not (path / "model_index.json").is_file():
        return [
            RecipeIssue(
                loc,
                "has no model_index.json, so it is not a diffusers pipeline directory",
                pretrained,
                hint="Save the whole pipeline with pipe.save_pretrained(dir).",
            )
        ]
    return []


def _output_dir_issues(output_dir: str) -> list[RecipeIssue]:
    path = Path(output_dir).expanduser()
    loc = ("output_dir",)
    if path.exists() and not path.is_dir():
        return [
            RecipeIssue(
                loc,
                "is a file; the run directory must be a directory",
                output_dir,
                hint="Point output_dir elsewhere or move the file.",
            )
        ]
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return [
            RecipeIssue(loc, f"cannot be created: {existing} is a file", output_dir, hint="Point output_dir elsewhere.")
        ]
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [
            RecipeIssue(
                loc,
                f"cannot be written: {existing} is not writable",
                output_dir,
                hint="Point output_dir at a writable location.",
            )
        ]
    return []
