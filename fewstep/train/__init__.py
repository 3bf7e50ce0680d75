"""The one accelerate trainer (DESIGN §5): optimizers, EMA, checkpoint/resume, logging."""

from fewstep.train.build import Components, build_components
from fewstep.train.checkpoint import CheckpointError, latest_checkpoint, load_trainable_weights
from fewstep.train.loop import train

__all__ = ["CheckpointError", "Components", "build_components", "latest_checkpoint", "load_trainable_weights", "train"]
