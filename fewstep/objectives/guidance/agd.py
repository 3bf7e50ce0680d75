"""``agd``: adapter guidance distillation (AGD, arXiv 2503.07274, ``cristianpjensen/agd``).

The base stays frozen and shared (no copy); ``fewstep.models.agd`` adapters (~2% extra parameters, zero-initialised
outputs) are the only trained weights. Training data are the states the **base's CFG sampler** visits (no dataset):

1. every ``record_every`` steps, run the base's deterministic CFG sampler (``trajectory_steps`` steps) from fresh noise
   for the batch's conditions, with ``w ~ U[w_min, w_max]`` per trajectory, recording at every step the input
   ``x_τ``, ``τ``, ``w``, the conditions and the CFG output ``out_∅ + w·(out_c − out_∅)`` into a buffer. With
   ``level_jitter`` (default) each recording's grid is offset by a random fraction of a step: a few-step sampler's
   states then cover every level, not ``trajectory_steps`` of them (AGD records 1,000-step trajectories; the
   adapters of a fixed 8-step grid were worse than the base between its levels);
2. draw a batch of recorded states, set the adapters' ``w`` and regress the adapted base's single raw output on the
   recorded CFG output (MSE, AGD ``train.py``).

Sampling: any one-forward-per-step sampler with ``adapters.set_guidance(w)``; ``adapters.disabled()`` is the base.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from fewstep.models.agd import AGDAdapters, class_count, find_targets, save_agd
from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.objectives.guidance.guidance_distill import GuidedSampler, recommended_w, sample_w
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, deterministic_spec
from fewstep.solvers.grids import sampling_taus
from fewstep.solvers.steps import ddim_step


class AGDConfig(BaseModel):
    """Recipe block of ``agd`` (defaults: AGD's SD settings). ``w``: Imagen convention."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["agd"] = "agd"
    w_min: float = Field(1.0, ge=0.0, description="lowest CFG w of the recorded trajectories (AGD: 1)")
    w_max: float = Field(12.0, ge=0.0, description="highest CFG w (AGD: 12)")
    hidden_dim: int = Field(320, ge=1, description="adapter attention width (AGD: 320)")
    target_modules: str | None = Field(None, description="regex of wrapped modules; None: UNet attn2 / SD3 attn")
    trajectory_steps: int = Field(25, ge=1, description="CFG sampler steps per recorded trajectory")
    level_jitter: bool = Field(True, description="offset each recording's grid by a random fraction of a step")
    record_every: int = Field(10, ge=1, description="record a new batch of trajectories every N steps")
    buffer_states: int = Field(4096, ge=1, description="most recent recorded states kept for training")
    resolution: int | None = Field(None, description="pixel size of recorded latents (data without x0)")
    sample_guidance_scale: float | None = Field(None, description="w for sample grids; None: teacher's, clamped")
    sample_steps_note: int = Field(25, ge=1, description="recommended sampling steps written to the export")

    @model_validator(mode="after")
    def _range(self) -> AGDConfig:
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min}) (Imagen w, 1 = off).")
        return self


class StateBuffer:
    """The most recent ``capacity`` recorded sampler states: ``x [n, ...]``, ``tau [n]``, ``w [n]``,
    ``target [n, ...]`` (CFG raw output) and their conditions."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: list[tuple[Tensor, Tensor, Tensor, Tensor, Conditioning]] = []

    def __len__(self) -> int:
        return sum(c[0].shape[0] for c in self.chunks)

    def add(self, x: Tensor, tau: Tensor, w: Tensor, target: Tensor, cond: Conditioning) -> None:
        self.chunks.append((x.detach(), tau.detach(), w.detach(), target.detach(), cond.detach()))
        while len(self) - self.chunks[0][0].shape[0] >= self.capacity:
            self.chunks.pop(0)

    def draw(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Conditioning]:
        x, tau, w, target = (torch.cat([c[i] for c in self.chunks]) for i in range(4))
        idx = torch.randint(0, x.shape[0], (n,), device=x.device)
        cond = Conditioning.cat([c[4] for c in self.chunks])
        return x[idx], tau[idx], w[idx], target[idx], cond.index(idx) if cond.batch_size is not None else cond


@OBJECTIVES.register("agd")
class AGD:
    """Adapter guidance distillation.

    Args:
        config: the ``objective`` recipe block.
        teacher: the CFG base (needs a null conditioning); stays frozen, shared with the student.
        student: ``student.kind: full`` — its copy is dropped for the shared base; only the adapters train.
    """

    Config = AGDConfig
    bypasses_prepared = False

    def __init__(self, config: AGDConfig, teacher: Teacher, student: Student) -> None:
        if teacher.null_cond is None:
            raise ValueError("AGD distils classifier-free guidance: the teacher needs a null conditioning.")
        if student.is_lora:
            raise ValueError(
                "AGD trains its own adapters on the frozen base: set student.kind: full (the copy is dropped and the "
                "base shared; no LoRA is trained)."
            )
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        base = teacher.denoiser.backbone
        student.denoiser.backbone = base  # share the frozen base: no second copy
        base.requires_grad_(False)
        timestep_scale = 1000.0 if teacher.family == "flux" else 1.0  # Flux feeds s ∈ [0, 1]
        specs = find_targets(base, config.target_modules)
        self.adapters = AGDAdapters(specs, config.hidden_dim, timestep_scale, class_count(base))
        self.adapters.to(next(base.parameters()).device).attach(base)
        teacher.add_view(self.adapters.disabled)  # the teacher (and CFG targets) is the base exactly
        self.buffer = StateBuffer(config.buffer_states)
        self._online: nn.Module = self.adapters

    def trainable(self) -> dict[str, nn.Module]:
        return {"adapters": self.adapters}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._online = prepared["adapters"]

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        return "adapters"

    def extra_parameter_fraction(self) -> float:
        """Adapter parameters / base parameters (AGD: about 2%)."""
        base = sum(p.numel() for p in self.teacher.denoiser.backbone.parameters())
        return sum(p.numel() for p in self.adapters.parameters()) / base

    @torch.no_grad()
    def record(self, batch: Batch) -> None:
        """Run the base's CFG sampler for the batch's conditions (``w ~ U`` per trajectory) and record every state."""
        cond = batch.cond
        uncond = batch.uncond if batch.uncond is not None else self.teacher.uncond_like(cond)
        b = batch.batch_size
        if batch.x0 is not None:
            shape = tuple(batch.x0.shape)
        else:
            from fewstep.models.backbones import latent_shape

            shape = latent_shape(self.teacher, b, self.config.resolution)
        device = next(self.teacher.denoiser.backbone.parameters()).device
        x = torch.randn(shape, device=device)
        w = sample_w(b, self.config.w_min, self.config.w_max).to(device)
        offset = float(torch.rand(())) - 0.5 if self.config.level_jitter else 0.0
        ntok = num_tokens(self.teacher.denoiser, x.shape)
        taus = sampling_taus(self.schedule, self.config.trajectory_steps, ntok, offset).to(x.device)
        for i in range(len(taus) - 1):
            tau = taus[i].expand(b)
            target = self.teacher.raw(x, tau, cond, uncond, w)  # CFG output, the base (adapters off)
            self.buffer.add(x, tau, w, target, cond)
            x = ddim_step(self.schedule, self.teacher.denoiser.to_prediction(target, x, tau), taus[i + 1].expand(b))

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """``MSE(out_{base+adapters}(x_τ, τ, c; w), out_cfg)`` on recorded CFG-sampler states."""
        if step % self.config.record_every == 0 or len(self.buffer) == 0:
            self.record(batch)
        x, tau, w, target, cond = self.buffer.draw(batch.batch_size)
        self.adapters.set_guidance(w)
        out = self._online(self.student.denoiser.raw, x, tau, cond).float()  # through the prepared adapters
        loss = F.mse_loss(out, target)
        return LossOutput(loss, {"loss": float(loss.detach()), "buffer_states": float(len(self.buffer))})

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def condition(self, cond: Conditioning, w: float | Tensor, b: int) -> Conditioning:
        """Set the adapters' guidance ``w`` for the next forwards (the conditioning itself is unchanged)."""
        self.adapters.set_guidance(w)
        return cond

    def sampler(self) -> GuidedSampler:
        cfg = self.config
        w = recommended_w(self.teacher, cfg.w_min, cfg.w_max, cfg.sample_guidance_scale)
        return GuidedSampler(self.student.denoiser, self.schedule, self.condition, w)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the state buffer is re-recorded after a resume

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"agd keeps no state; got keys {sorted(state)}.")

    def sampling_spec(self, steps: tuple[int, ...] = (25,)) -> SamplingSpec:
        cfg = self.config
        w = recommended_w(self.teacher, cfg.w_min, cfg.w_max, cfg.sample_guidance_scale)
        notes = [
            "AGD adapters: `adapters = fewstep.models.agd.load_agd(pipe.unet (or pipe.transformer), dir)`, "
            "`adapters.set_guidance(w)`, then call the pipeline with guidance_scale=1 (one forward per step). "
            "They are forward hooks: other LoRAs load as usual and compose.",
        ]
        return deterministic_spec(
            self.teacher, "agd", steps, "euler", recommended=cfg.sample_steps_note, guidance_scale=1.0,
            guidance_convention=f"{GUIDANCE_CONVENTION}; pass w to adapters.set_guidance (trained for w in "
            f"[{cfg.w_min}, {cfg.w_max}]; recommended {w}), and guidance_scale=1 to the pipeline", notes=notes,
        )  # fmt: skip

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """``agd_adapters.safetensors`` + ``agd_config.json`` (``fewstep.models.agd.load_agd``)."""
        cfg = self.config
        save_agd(self.adapters, out_dir, extra={
            "w_min": cfg.w_min, "w_max": cfg.w_max, "guidance_convention": GUIDANCE_CONVENTION,
            "recommended_guidance_scale": recommended_w(self.teacher, cfg.w_min, cfg.w_max, cfg.sample_guidance_scale),
        })  # fmt: skip
