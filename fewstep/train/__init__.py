"""The one accelerate trainer: optimizers, EMA, checkpoint/resume, logging; ``load_run`` reads a run back."""

from fewstep.train.build import Components, build_components
from fewstep.train.checkpoint import CheckpointError, latest_checkpoint, load_trainable_weights
from fewstep.train.loop import train
from fewstep.train.run import LoadedRun, load_run

__all__ = [
    "CheckpointError",
    "Components",
    "LoadedRun",
    "build_components",
    "latest_checkpoint",
    "load_run",
    "load_trainable_weights",
    "train",
]
