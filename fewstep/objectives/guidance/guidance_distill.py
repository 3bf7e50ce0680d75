"""``guidance_distill``: classic guidance distillation (Meng et al. 2023, stage 1).

A student conditioned on the guidance scale ``w`` learns, in one forward, the teacher's two-forward CFG output
``ŷ_∅ + w·(ŷ_c − ŷ_∅)`` (Imagen convention, w = 1 is off). One step: ``x_τ = α·x0 + σ·ε`` from the data, ``w ~
U[w_min, w_max]``, ``‖out_θ(x_τ, τ, c, w) − out_cfg^w(x_τ, τ, c)‖²`` on raw outputs (ε-space MSE for ε models: the
SNR-weighted x̂0 loss). The student is initialised from the teacher (full or LoRA) and fed ``w`` by:

* ``timestep_cond`` (full ``UNet2DConditionModel`` students): LCM's ω-embedding of ``ω = w − 1`` with a zero-init
  ``cond_proj``. diffusers' SD / SDXL pipelines feed it natively: ``pipe(prompt, guidance_scale=w)`` then runs one
  forward per step (they skip CFG when ``unet.config.time_cond_proj_dim`` is set).
* ``hook`` (any backbone, LoRA students): a zero-initialised ``MLP(sin(1000·w))`` added to the output of the time
  embedding (``time_embedding`` for UNets, ``time_text_embed`` for SD3 / Flux, or ``embed_target``), exported as
  ``guidance_embedding.safetensors`` next to the LoRA.

``GuidedSampler`` (shared with ``agd``) samples a w-conditioned student deterministically with one forward per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from fewstep.models.agd import FREQ_DIM, sinusoidal
from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser, eval_mode
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.schedules import Schedule
from fewstep.objectives.protocol import OBJECTIVES, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec, deterministic_spec
from fewstep.solvers.grids import sampling_taus
from fewstep.solvers.samplers import sample_ddim
from fewstep.solvers.steps import noise_to

EMBED_TARGETS = ("time_embedding", "time_text_embed")
EMBED_FILE = "guidance_embedding.safetensors"


class GuidanceDistillConfig(BaseModel):
    """Recipe block of ``guidance_distill``. ``w_min``/``w_max``: Imagen ``w`` (w = 1 is no guidance)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["guidance_distill"] = "guidance_distill"
    w_min: float = Field(1.0, ge=0.0)
    w_max: float = Field(8.0, ge=0.0)
    embedding: Literal["auto", "timestep_cond", "hook"] = Field(
        "auto", description="auto: timestep_cond for a full UNet2DConditionModel student, else hook"
    )
    embed_target: str | None = Field(None, description="hook: module whose output gets + MLP(w)")
    guidance_embedding_dim: int = Field(256, ge=2, description="timestep_cond: time_cond_proj_dim")
    sample_guidance_scale: float | None = Field(None, description="w for sample grids; None: teacher's, clamped")
    sample_steps_note: int = Field(25, ge=1, description="recommended sampling steps written to the export")

    @model_validator(mode="after")
    def _range(self) -> GuidanceDistillConfig:
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min}) (Imagen w, 1 = off).")
        return self


def sample_w(n: int, w_min: float, w_max: float) -> Tensor:
    """``w ~ U[w_min, w_max]``, ``[n]``."""
    return w_min + (w_max - w_min) * torch.rand(n)


def recommended_w(teacher: Teacher, w_min: float, w_max: float, override: float | None) -> float:
    w = teacher.guidance_scale if override is None else override
    return float(min(max(w, w_min), w_max))


class GuidanceEmbedder(nn.Module):
    """``MLP(sin(1000·w))`` added to a module's output (``[b, D]`` or ``[b, ..., D]``); the last layer starts at zero.

    Args:
        dim: the target module's output features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.enabled, self._w = True, None
        self._handle: Any = None

    def set_guidance(self, w: float | Tensor | None) -> None:
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float32)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def attach(self, module: nn.Module) -> GuidanceEmbedder:
        if self._handle is not None:
            self._handle.remove()
        self._handle = module.register_forward_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.enabled or self._w is None:
            return output
        b = output.shape[0]
        w = self._w.to(output.device).reshape(-1)
        emb = self(w.expand(b) if w.numel() == 1 else w)  # through forward: a sharded (FSDP) embedder gathers there
        return output + emb.reshape(b, *([1] * (output.ndim - 2)), -1).to(output.dtype)

    def forward(self, w: Tensor) -> Tensor:
        """The embedding ``[b, D]`` of guidance scales ``w`` ``[b]``."""
        return self.mlp(sinusoidal(w * 1000.0).to(self.mlp[0].weight.dtype))


def _embed_target(backbone: nn.Module, name: str | None) -> tuple[str, nn.Module, int]:
    modules = dict(backbone.named_modules())
    names = [name] if name else [n for n in EMBED_TARGETS if n in modules]
    if not names or names[0] not in modules:
        raise ValueError(
            f"No module {name or ' / '.join(EMBED_TARGETS)!r} in {type(backbone).__name__} to add the w-embedding to. "
            "Set objective.embed_target to the name of its time-embedding module."
        )
    module = modules[names[0]]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"objective.embed_target {names[0]!r} has no Linear layer to read its output size from.")
    return names[0], module, linears[-1].out_features


@dataclass
class GuidedSampler:
    """Deterministic DDIM / Euler sampling of a w-conditioned student, one forward per step.

    ``condition(cond, w, b) -> cond`` prepares the student for ``w`` (sets adapters or fills ``timestep_cond``).
    """

    denoiser: Denoiser
    schedule: Schedule
    condition: Callable[[Conditioning, float, int], Conditioning]
    guidance_scale: float

    def __call__(
        self, noise: Tensor, cond: Conditioning, num_steps: int, generator: torch.Generator | None = None
    ) -> Tensor:
        taus = sampling_taus(self.schedule, num_steps, num_tokens(self.denoiser, noise.shape)).to(noise.device)
        cond = self.condition(cond.to(noise.device), self.guidance_scale, noise.shape[0])
        with torch.no_grad(), eval_mode(self.denoiser):
            return sample_ddim(lambda x, t: self.denoiser(x, t, cond), self.schedule, noise, taus)


@OBJECTIVES.register("guidance_distill")
class GuidanceDistill:
    """Classic guidance distillation into a w-conditioned student.

    Args:
        config: the ``objective`` recipe block.
        teacher: the CFG teacher (needs a null conditioning).
        student: full or LoRA, initialised from the teacher.
    """

    Config = GuidanceDistillConfig
    bypasses_prepared = False

    def __init__(self, config: GuidanceDistillConfig, teacher: Teacher, student: Student) -> None:
        if teacher.null_cond is None:
            raise ValueError("Guidance distillation needs a conditional teacher with a null conditioning for CFG.")
        self.config, self.teacher, self.student = config, teacher, student
        self.schedule = teacher.schedule
        backbone = student.denoiser.backbone
        kind = config.embedding
        if kind == "auto":
            is_unet = type(backbone).__name__ == "UNet2DConditionModel"
            kind = "timestep_cond" if is_unet and not student.is_lora else "hook"
        self.kind = kind
        self.embedder: GuidanceEmbedder | None = None
        if kind == "timestep_cond":
            from fewstep.objectives.consistency.lcm import add_guidance_embedding

            if student.is_lora:
                raise ValueError("embedding: timestep_cond adds a layer a LoRA cannot carry; use embedding: hook.")
            student.denoiser.backbone = add_guidance_embedding(backbone, config.guidance_embedding_dim)
        else:
            self.embed_name, module, dim = _embed_target(backbone, config.embed_target)
            param = next(backbone.parameters())
            self.embedder = GuidanceEmbedder(dim).to(param.device).attach(module)
            student.guidance_embedder = self.embedder  # a submodule: trained, checkpointed with the student
            if student.is_lora:  # the shared base: the teacher's view also switches the w-embedding off
                teacher.add_view(self.embedder.disabled)
        self._online: nn.Module = student

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._online = prepared["student"]

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        return "student"

    def student_cond(self, cond: Conditioning, w: float | Tensor, b: int) -> Conditioning:
        """Prepare the student for guidance ``w`` (``[b]`` or a float) and return its conditioning."""
        w = torch.as_tensor(w, dtype=torch.float32)
        w = w.reshape(-1).expand(b) if w.numel() == 1 else w
        if self.kind == "timestep_cond":
            from fewstep.objectives.consistency.lcm import guidance_scale_embedding

            dim = self.student.denoiser.backbone.config.time_cond_proj_dim
            emb = guidance_scale_embedding(w - 1.0, dim)  # diffusers pipelines embed ω = w − 1
            return cond.replace(timestep_cond=emb.to(device=w.device, dtype=self.student.denoiser.dtype))
        self.embedder.set_guidance(w)
        return cond

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        """``mean‖out_θ(x_τ, τ, c, w) − out_cfg^w(x_τ, τ, c)‖²`` on forward-noised data."""
        from fewstep.objectives.diffusion import DiffusionConfig, sample_tau

        if batch.x0 is None:
            raise ValueError("guidance_distill noises data (Meng et al. stage 1): the batch needs x0. For data-free "
                             "guidance distillation use the `agd` objective (states from CFG sampling).")  # fmt: skip
        x0 = batch.x0.float()
        b = x0.shape[0]
        tau = sample_tau(self.schedule, b, DiffusionConfig()).to(x0.device)
        x_tau = noise_to(self.schedule, x0, torch.randn_like(x0), tau)
        w = sample_w(b, self.config.w_min, self.config.w_max).to(x0.device)
        target = self.teacher.raw(x_tau, tau, batch.cond, batch.uncond, w)  # two forwards, no grad
        cond = self.student_cond(batch.cond, w, b)
        out = _raw(self._online, x_tau, tau, cond)  # through the prepared (DDP) student
        loss = F.mse_loss(out, target)
        return LossOutput(loss, {"loss": float(loss.detach()), "w_mean": float(w.mean())})

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def sampler(self) -> GuidedSampler:
        cfg = self.config
        w = recommended_w(self.teacher, cfg.w_min, cfg.w_max, cfg.sample_guidance_scale)
        return GuidedSampler(self.student.denoiser, self.schedule, self.student_cond, w)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"guidance_distill keeps no state; got keys {sorted(state)}.")

    def sampling_spec(self, steps: tuple[int, ...] = (25,)) -> SamplingSpec:
        cfg = self.config
        w = recommended_w(self.teacher, cfg.w_min, cfg.w_max, cfg.sample_guidance_scale)
        if self.kind == "timestep_cond":
            notes = ["One forward per step: the UNet embeds ω = w − 1 through timestep_cond (time_cond_proj_dim), "
                     "which diffusers' SD/SDXL pipelines fill from guidance_scale and then skip CFG."]  # fmt: skip
        else:
            notes = [f"The w-embedding is a hook on `{self.embed_name}`: load {EMBED_FILE} with "
                     "fewstep.objectives.guidance.guidance_distill.load_guidance_embedding(pipe.unet, dir), "
                     "set_guidance(w), then "
                     "call the pipeline with guidance_scale=1."]  # fmt: skip
        return deterministic_spec(
            self.teacher, "guidance_distill", steps, "euler", recommended=cfg.sample_steps_note, guidance_scale=w,
            guidance_convention=f"{GUIDANCE_CONVENTION}; trained for w in [{cfg.w_min}, {cfg.w_max}]", notes=notes,
        )  # fmt: skip

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """The hook w-embedding as ``guidance_embedding.safetensors`` (the LoRA file does not carry it)."""
        if self.embedder is None:
            return
        from safetensors.torch import save_file

        state = {k: v.detach().float().cpu().contiguous() for k, v in self.embedder.state_dict().items()}
        save_file(state, str(Path(out_dir) / EMBED_FILE), metadata={"target": self.embed_name})


def load_guidance_embedding(backbone: nn.Module, path: str | Path) -> GuidanceEmbedder:
    """Attach an exported hook w-embedding (``guidance_embedding.safetensors``) to ``backbone``; returns it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / EMBED_FILE
    with safe_open(str(file), "pt") as f:
        target = f.metadata()["target"]
    name, module, dim = _embed_target(backbone, target)
    embedder = GuidanceEmbedder(dim)
    embedder.load_state_dict(load_file(str(file)))
    return embedder.to(next(backbone.parameters()).device).attach(module)


def _raw(module: nn.Module, x: Tensor, tau: Tensor, cond: Conditioning) -> Tensor:
    """Raw output through a prepared (e.g. DDP) student: its prediction mapped back to the native output."""
    from fewstep.noise.convert import from_x0_eps

    inner = getattr(module, "module", module)
    pred = module(x, tau, cond)
    s = inner.denoiser.schedule
    return from_x0_eps(pred.x0, pred.eps, s.alpha(tau), s.sigma(tau), inner.denoiser.prediction_type).float()
