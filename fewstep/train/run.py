"""Load a training run: its recipe, rebuilt components and one checkpoint's weights, EMA or raw.

``load_run`` is the one loader behind ``fewstep export``, ``fewstep eval``, the quickstart and the benchmark scripts,
so they all pick the same checkpoint and the same weights by default: the newest complete checkpoint, with the EMA
of the trained weights when the run kept one (``train.ema_decay``; ``ema.safetensors`` in the checkpoint).

A checkpoint is ``latest`` (or ``newest``: the newest ``checkpoints/step_XXXXXXXX``), ``best`` (``checkpoints/best``,
kept by periodic evaluation), ``step_N`` (the checkpoint of step N) or a path to a checkpoint directory. Its files are
checked against its ``manifest.json`` before the model is built, and its fingerprint against the rebuilt model
(``fewstep.train.checkpoint.verify_checkpoint``): a changed file or another model's checkpoint is refused with the file
named; ``latest`` passes over a corrupt newest checkpoint to the newest intact one, with a warning. Every weight is
copied with exactly the shape of the parameter it lands in; a mismatch (an edited ``resolved_config.yaml``, another LoRA
rank) is an error, never a broadcast.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.config.load import load_recipe
from fewstep.models.teacher import Teacher
from fewstep.train.build import Components, build_components
from fewstep.train.checkpoint import (
    BEST,
    COMPLETE,
    EMA_FILE,
    PREFIX,
    check_fingerprint,
    checkpoint_dir,
    checkpoint_fingerprint,
    has_ema,
    intact_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_ema_weights,
    load_trainable_weights,
)
from fewstep.train.ema import shape_mismatches, trainable_parameters

logger = logging.getLogger(__name__)

CONFIG_FILE = "resolved_config.yaml"
WEIGHTS = ("auto", "ema", "raw")
NEWEST = ("latest", "newest")  # names of the newest complete checkpoint


@dataclass
class LoadedRun:
    """A training run rebuilt from its directory, with one checkpoint's weights loaded.

    Attributes:
        run_dir: the run directory (the recipe's ``output_dir``).
        recipe: the run's resolved recipe (``resolved_config.yaml``).
        components: ``Components`` (teacher, student, objective) holding the loaded weights; the student is in
            eval mode, everything on the CPU.
        checkpoint: the checkpoint directory the weights came from.
        weights: ``"ema"`` (the EMA of the trained weights) or ``"raw"`` (the trained weights themselves).
    """

    run_dir: Path
    recipe: Any
    components: Components
    checkpoint: Path
    weights: str

    def source(self) -> dict[str, str]:
        """``{"run", "checkpoint", "weights"}``: where these weights came from (for exports and reports)."""
        return {"run": str(self.run_dir), "checkpoint": str(self.checkpoint), "weights": self.weights}


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path = "latest") -> Path:
    """``latest`` or ``newest`` (the newest complete checkpoint), ``best`` (``checkpoints/best``), ``step_N`` (the
    checkpoint of step N, e.g. ``step_500``) or a checkpoint path.

    Raises:
        FileNotFoundError: the run has no complete checkpoint, or the named one is not complete (for ``step_N``: the
            message lists the steps the run has).
    """
    run_dir = Path(run_dir)
    name = str(checkpoint)
    if name in NEWEST:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(
                f"No complete checkpoint in {str(run_dir / 'checkpoints')!r}: nothing to load. Train until the "
                "first checkpoint (train.checkpoint_every) or resume the run; SIGINT/SIGTERM also write one."
            )
        return found
    step = re.fullmatch(rf"{PREFIX}(\d+)", name)
    if step is not None and not Path(name).is_dir():
        path = checkpoint_dir(run_dir, int(step.group(1)))
        if not (path / COMPLETE).is_file():
            steps = [int(p.name.removeprefix(PREFIX)) for p in list_checkpoints(run_dir)]
            raise FileNotFoundError(
                f"{str(run_dir)!r} has no complete checkpoint of step {int(step.group(1))}; its checkpoints are at "
                f"steps {steps or 'none'}. Pass one of those (step_N), latest or best."
            )
        return path
    path = run_dir / "checkpoints" / BEST if name == BEST else Path(checkpoint)
    if not (path / COMPLETE).is_file():
        hint = "Set eval.every_steps in the recipe to keep one" if name == BEST else "Pass latest, best, step_N or"
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete checkpoint (no {COMPLETE} marker). {hint} a checkpoints/step_XXXXXXXX "
            "directory."
        )
    return path


def load_trainable(module: nn.Module, state: dict[str, Tensor], name: str) -> None:
    """Load checkpointed trainable weights into ``module``: every trainable parameter must be covered, no key left
    over, every shape exactly the parameter's."""
    current = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    unexpected = sorted(set(state) - set(current))
    uncovered = sorted(trainable - set(state))
    reshaped = shape_mismatches(current, state)
    if unexpected or uncovered or reshaped:
        raise ValueError(
            f"Checkpoint weights for {name!r} do not match the rebuilt model: unexpected keys {unexpected[:5]}, "
            f"trainable parameters without weights {uncovered[:5]}, other shapes {reshaped[:5]}. Was the run's "
            f"{CONFIG_FILE} edited?"
        )
    module.load_state_dict(state, strict=False)


def apply_ema(groups: dict[str, nn.Module], state: dict[str, Tensor], path: str | Path = EMA_FILE) -> None:
    """Copy EMA shadows (``{"<group>/<param>": tensor}``, as in ``ema.safetensors``) into the trainable parameters.

    Every trainable parameter of every group needs its shadow, with exactly its shape.

    Raises:
        ValueError: missing, unexpected or reshaped shadows (the message lists them).
    """
    params = {f"{g}/{n}": p for g, module in groups.items() for n, p in trainable_parameters(module).items()}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    reshaped = shape_mismatches(params, state)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"EMA weights {str(path)!r} do not match the rebuilt trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {reshaped[:5]}. Was the run's {CONFIG_FILE} edited?"
        )
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


def load_run(
    run_dir: str | Path,
    checkpoint: str | Path = "latest",
    weights: str = "auto",
    teacher: Teacher | None = None,
) -> LoadedRun:
    """Rebuild a run's teacher, student and objective and load one checkpoint's weights.

    Args:
        run_dir: the run directory (``resolved_config.yaml`` + ``checkpoints/``).
        checkpoint: ``latest`` (or ``newest``), ``best``, ``step_N`` or a checkpoint directory.
        weights: ``auto`` (EMA when the checkpoint has ``ema.safetensors``, else raw), ``ema`` or ``raw``.
        teacher: the run's custom teacher (``Teacher.from_module``), if it was trained with one.

    Returns:
        A ``LoadedRun``; ``weights`` says which weights were loaded.

    Raises:
        ValueError: ``weights`` is not one of ``WEIGHTS``, or the checkpoint does not fit the rebuilt model.
        FileNotFoundError: not a run directory, no such complete checkpoint, or ``ema`` for a run without EMA.
        CheckpointError: a file of the checkpoint does not match its manifest (``latest``: no intact checkpoint
            left), or the checkpoint holds another model's weights; the message names the file.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}.")
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no {CONFIG_FILE}, so it is not a fewstep run directory. Pass the recipe's "
            "output_dir (written by `fewstep train`)."
        )
    # every file checked before the model is built; `latest` passes over a corrupt newest checkpoint
    ckpt = intact_checkpoint(resolve_checkpoint(run_dir, checkpoint), fallback=str(checkpoint) in NEWEST)
    ema_file = ckpt / EMA_FILE
    if weights == "ema" and not has_ema(ckpt):
        raise FileNotFoundError(
            f"{str(ema_file)!r} does not exist: the run kept no EMA (train.ema_decay was null). Load the raw weights "
            "(weights='raw', --weights raw)."
        )
    recipe = load_recipe(config)
    components = build_components(recipe, teacher=teacher)
    groups = components.objective.trainable()
    check_fingerprint(ckpt, checkpoint_fingerprint(groups, recipe, components.teacher))
    trained = load_trainable_weights(ckpt)
    for group, module in groups.items():
        if group not in trained:
            raise ValueError(f"Checkpoint {str(ckpt)!r} has no weights for {group!r} (has {sorted(trained)}).")
        load_trainable(module, trained[group], group)
    used = "ema" if weights != "raw" and has_ema(ckpt) else "raw"
    if used == "ema":
        apply_ema(groups, load_ema_weights(ckpt), ema_file)
    components.student.eval()
    logger.info("Loaded %s (%s weights)", ckpt, used)
    return LoadedRun(run_dir, recipe, components, ckpt, used)
