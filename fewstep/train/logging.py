"""What a run shows while it trains: scalars, sample grids and collapse alarms, on accelerate's trackers.

Trackers: ``train.log_with`` (default ``[tensorboard]``; any tracker accelerate supports and this machine has).
TensorBoard events go to ``<run_dir>/fewstep/``; wandb runs to ``<run_dir>/wandb/`` (or ``$WANDB_DIR``), offline
when ``WANDB_MODE=offline`` or no API key is configured (``wandb sync`` uploads them later).

Every ``train.log_every`` steps the main process logs ``loss``, ``grad_norm/<group>``, the objective's metrics as it
names them (``metrics/<name>``), ``lr/<group>`` (``lr/<group>/<i>`` for optimizers with several parameter groups),
``time/step_s``, ``throughput/samples_per_s`` (plus ``tokens_per_s`` for transformer families, ``frames_per_s`` for
video latents) and peak memory (``memory/cuda_max_allocated_mib`` on CUDA, else ``memory/peak_rss_mib``). Alarms
(``fewstep.train.alarms``) are checked every step and at every grid: a warning in the log, ``alarm/<name>`` = 1 on the
trackers (0 when the episode ends) and the message as text where the tracker takes text.

Sample grids: one row per student step count (``train.sample_steps``, labelled on the left), one column per fixed
noise and conditioning (its class or prompt on top), the same at every logged step, so grids are comparable across a
run. Files: ``<run_dir>/samples/step_XXXXXXXX.png``; the same grid goes to every tracker that takes images
(tensorboard, wandb, aim, clearml, swanlab) as ``samples``.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.data.images import save_sample_grid
from fewstep.models.conditioning import Conditioning
from fewstep.train.alarms import Alarm, AlarmMonitor

logger = logging.getLogger(__name__)

METRICS = "metrics"  # the objective's metrics are logged as metrics/<name>
PROJECT = "fewstep"  # accelerate's project name: the tensorboard subdirectory, the wandb project
IMAGE_LISTS = ("wandb", "swanlab")  # trackers whose log_images takes a list of images per key
SINGLE_IMAGES = ("aim", "clearml")  # ... one image per key
TEXT_TRACKERS = ("tensorboard", "wandb", "comet_ml")  # trackers whose log() takes a string value


@torch.no_grad()
def write_samples(
    objective: Any,
    teacher: Any,
    noise: Tensor,
    cond: Conditioning,
    sample_steps: list[int],
    path: Path,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    save: bool = True,
) -> list[Tensor]:
    """Sample the student at each step count on fixed ``noise``/``cond``, decode and save one grid row per count,
    labelled with its step count; ``labels`` (default: the class labels in ``cond``) head the columns. Returns the
    rows: images ``[n, c, H, W]`` in ``[0, 1]`` (a video's first frame), one per step count. ``save=False`` samples
    without writing (the other processes of a sharded run, whose forwards the main one needs)."""
    from fewstep.models.vae import decode_latents, vae_loaded

    sampler = objective.sampler()
    rows = []
    with vae_loaded(teacher):  # a teacher trained from a cache loads its VAE for the grid only
        for num_steps in sample_steps:
            gen = torch.Generator().manual_seed(seed)  # re-noising samplers draw the same noise every time
            x0 = sampler(noise, cond, num_steps, gen)
            images = decode_latents(teacher, x0).float()
            rows.append(images[:, :, 0] if images.ndim == 5 else images)  # videos [n, c, f, H, W]: the first frame
    if labels is None and cond.class_labels is not None:
        labels = [str(int(c)) for c in cond.class_labels]
    row_labels = [f"{n} step{'s' if n != 1 else ''}" for n in sample_steps]
    if save:
        save_sample_grid(rows, path, row_labels=row_labels, column_labels=labels)
    return rows


def flatten_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def learning_rates(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
    """``lr/<group>`` per optimizer, ``lr/<group>/<i>`` per parameter group where an optimizer has several."""
    out = {}
    for name, optimizer in optimizers.items():
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            out[f"lr/{name}" if len(groups) == 1 else f"lr/{name}/{i}"] = float(group["lr"])
    return out


# --- trackers ---------------------------------------------------------------------------------------------------------


def wandb_has_credentials() -> bool:
    """Whether wandb could log in without asking: ``WANDB_API_KEY`` / an identity token file, or a netrc entry for
    the wandb host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """wandb runs offline when ``WANDB_MODE=offline`` or when there is no API key (never a login prompt)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return True
    return mode != "disabled" and not wandb_has_credentials()


def tracker_init_kwargs(recipe: Any) -> dict[str, dict[str, Any]]:
    """``init_kwargs`` for ``Accelerator.init_trackers``: wandb gets the run's name (``output_dir``'s), the resolved
    recipe as its config, ``<run_dir>`` as its directory unless ``WANDB_DIR`` is set, and offline mode where
    ``wandb_offline``."""
    run_dir = Path(recipe.output_dir)
    wandb: dict[str, Any] = {"name": run_dir.name, "config": recipe.model_dump(mode="json")}
    if not os.environ.get("WANDB_DIR"):
        wandb["dir"] = str(run_dir)
    if wandb_offline():
        wandb["mode"] = "offline"
    return {"wandb": wandb}


def log_image(accelerator: Any, key: str, image: Image.Image, step: int) -> None:
    """``image`` to every tracker of ``accelerator`` that takes images (main process only)."""
    if not accelerator.is_main_process:
        return
    image = image.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif tracker.name in IMAGE_LISTS:
            tracker.log_images({key: [image]}, step=step)
        elif tracker.name in SINGLE_IMAGES:
            tracker.log_images({key: image}, step=step)


def log_text(accelerator: Any, key: str, text: str, step: int) -> None:
    """``text`` to every tracker that takes text (tensorboard's Text tab, wandb, Comet) (main process only)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name in TEXT_TRACKERS:
            tracker.log({key: text}, step=step)


# --- throughput and memory --------------------------------------------------------------------------------------------


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA's max allocated bytes on a CUDA device, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return {"memory/cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"memory/peak_rss_mib": peak / (2**20 if sys.platform == "darwin" else 2**10)}


class StepMeter:
    """Step time and throughput averaged over the steps since the last ``scalars()``, and peak memory.

    Args:
        samples_per_step: samples one optimizer step consumes on all ranks (batch × accumulation × processes).
        item_shape: one sample's shape in the denoiser's space (``[c, h, w]``, ``[c, f, h, w]`` for video), if known.
        tokens_per_item: image tokens the backbone sees per sample (``fewstep.models.backbones.num_tokens``), if any.
        device: where the run trains (CUDA: memory from the allocator).
    """

    def __init__(
        self,
        samples_per_step: int,
        item_shape: tuple[int, ...] | None,
        tokens_per_item: int | None,
        device: torch.device,
    ) -> None:
        self.samples_per_step, self.tokens_per_item, self.device = samples_per_step, tokens_per_item, device
        self.frames_per_item = item_shape[1] if item_shape is not None and len(item_shape) == 4 else None
        self._seconds, self._steps = 0.0, 0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time one optimizer step."""
        began = time.perf_counter()
        yield
        self._seconds += time.perf_counter() - began
        self._steps += 1

    def scalars(self) -> dict[str, float]:
        """``time/step_s``, ``throughput/*_per_s`` since the last call, and peak memory; starts a new interval."""
        out = peak_memory(self.device)
        if self._steps and self._seconds > 0:
            step_s = self._seconds / self._steps
            samples_per_s = self.samples_per_step / step_s
            out.update({"time/step_s": step_s, "throughput/samples_per_s": samples_per_s})
            if self.tokens_per_item is not None:
                out["throughput/tokens_per_s"] = samples_per_s * self.tokens_per_item
            if self.frames_per_item is not None:
                out["throughput/frames_per_s"] = samples_per_s * self.frames_per_item
        self._seconds, self._steps = 0.0, 0
        return out


def item_shape(teacher: Any, resolution: int | None) -> tuple[int, ...] | None:
    """One sample's shape in the teacher's latent space at ``resolution``; None for a teacher without a pipeline."""
    from fewstep.models.backbones import latent_shape

    if teacher.pipeline is None:
        return None
    return tuple(latent_shape(teacher, 1, resolution)[1:])


# --- the run's reports ------------------------------------------------------------------------------------------------


class TrainingLog:
    """What the trainer reports: scalars with throughput and memory every ``train.log_every`` steps, sample grids as
    images, and collapse alarms (``train.alarms``). Only the main process logs or checks alarms.

    Objectives that alternate phases (DMD2's fake-score and generator steps, rCM's critic, PCM's discriminator)
    return different scalars on different steps. Each log carries the latest value of every scalar seen since the
    previous log, so a ``log_every`` that shares a factor with the phase cycle still shows every phase's metrics
    (at the step of the log, from that phase's most recent step).

    Args:
        accelerator: the run's ``Accelerator`` (trackers started with ``init_trackers``).
        recipe: the run's recipe.
        teacher: the run's teacher (the latent shape and token count behind the throughput).
    """

    def __init__(self, accelerator: Any, recipe: Any, teacher: Any) -> None:
        from fewstep.models.backbones import num_tokens

        self.acc, self.cfg = accelerator, recipe.train
        shape = item_shape(teacher, recipe.data.resolution)
        tokens = num_tokens(teacher.denoiser, (1, *shape)) if shape is not None else None
        samples = recipe.data.batch_size * self.cfg.gradient_accumulation_steps * accelerator.num_processes
        self.meter = StepMeter(samples, shape, tokens, accelerator.device)
        self.alarms = AlarmMonitor(self.cfg.alarms) if self.cfg.alarms.enabled else None
        self._latest: dict[str, float] = {}  # every scalar's latest value since the last log

    def timed(self) -> contextlib.AbstractContextManager[None]:
        """Wrap one optimizer step (its time feeds ``time/step_s`` and the throughput)."""
        return self.meter.timed()

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        """After optimizer step ``step``: alarms on the objective's metrics; the scalars every ``log_every`` steps."""
        if not self.acc.is_main_process:
            return
        if self.alarms is not None:
            prefix = f"{METRICS}/"
            metrics = {k.removeprefix(prefix): v for k, v in scalars.items() if k.startswith(prefix)}
            self._report(step, *self.alarms.metrics(step, metrics))
        self._latest.update(scalars)
        if self.cfg.log_every and step % self.cfg.log_every == 0:
            self.acc.log({**self._latest, **self.meter.scalars()}, step=step)
            self._latest = {}

    def samples(self, step: int, path: Path, rows: list[Tensor]) -> None:
        """A sample grid written at ``step`` (``path``, its ``rows`` in ``[0, 1]``): to the trackers, then alarms."""
        if not self.acc.is_main_process:
            return
        with Image.open(path) as image:
            log_image(self.acc, "samples", image, step)
        if self.alarms is not None:
            self._report(step, *self.alarms.samples(step, rows))

    def _report(self, step: int, fired: list[Alarm], cleared: list[str]) -> None:
        """Warn about each alarm that fired; ``alarm/<name>`` is 1 from its firing, 0 once its episode ended."""
        values = {f"alarm/{name}": 0.0 for name in cleared}
        for alarm in fired:
            logger.warning(alarm.message)
            values[f"alarm/{alarm.name}"] = 1.0
        if values:
            self.acc.log(values, step=step)
        for alarm in fired:
            log_text(self.acc, f"alarm/{alarm.name}/message", alarm.message, step)
