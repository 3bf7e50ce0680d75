"""``Teacher``: a frozen ``Denoiser`` plus classifier-free guidance in one convention, and multi-step sampling.

Guidance convention (Imagen): ``ŷ = ŷ_∅ + w·(ŷ_c − ŷ_∅)``; ``w = 1`` is no guidance. It is applied
once, on raw backbone outputs (exact because every conversion is affine with identical coefficients for both
branches). LCM's ``ω`` is ``w − 1``; objectives that sample ω convert at their edge.

A student that shares the teacher's module (a LoRA on its base, AGD's adapters, a hooked guidance embedding) gives the
teacher a *view* with ``Teacher.add_view``: a context under which the shared module is the teacher again (adapters
off, hooks off). Every teacher forward runs inside all of its views (``Teacher.view``), so no second copy of the base
exists (``Student.lora``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models.backbones import BackboneAdapter
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.noise.convert import Prediction, bcast
from fewstep.noise.schedules import Schedule

GUIDANCE_CONVENTION = "imagen: cfg = uncond + w * (cond - uncond); w = 1 disables guidance"


class Teacher:
    """A frozen denoiser with CFG.

    Args:
        denoiser: the wrapped backbone (frozen here: ``eval()`` and ``requires_grad_(False)``).
        guidance_scale: default ``w`` for ``predict`` and ``sample``.
        pipeline: the diffusers pipeline it came from, if any (VAE, encoders, scheduler, export).
        null_cond: the unconditional ``Conditioning`` for one sample (batch 1), repeated as needed.
        family: the backbone family name (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``unet2d``, ``custom``).

    Attributes:
        guidance_by_level: a default guidance that depends on the noise level, ``w(τ) -> [b]``, used where no
            ``guidance_scale`` is passed (Wan 2.2: one scale per expert, ``load_teacher`` with ``guidance_scale_2``);
            ``None``: ``guidance_scale`` everywhere.
        vae_loader: for a teacher loaded without its VAE (training from a cache, ``load_teacher(cfg,
            encoders=False)``): loads the VAE from disk when images are decoded
            (``fewstep.models.vae.vae_loaded``); ``None`` otherwise.
        cfg_rescale: ``(guided, cond) -> guided`` applied to the raw guided output whenever CFG is on, for
            pipelines that renormalise it (Qwen-Image's true CFG, ``qwen_true_cfg_rescale``); ``None``: plain CFG.
        guidance_off: ``τ -> [b] bool``, the levels at which the pipeline runs no guidance whatever its scale (Z-Image's
            ``cfg_truncation``): there any ``w`` is 1, the conditional output alone; ``None``: guidance everywhere.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        guidance_scale: float = 1.0,
        pipeline: Any = None,
        null_cond: Conditioning | None = None,
        family: str = "custom",
    ) -> None:
        self.denoiser = denoiser
        self.guidance_scale = guidance_scale
        self.pipeline = pipeline
        self.null_cond = null_cond
        self.family = family
        self.vae_loader: Callable[[], nn.Module] | None = None
        self.cfg_rescale: Callable[[Tensor, Tensor], Tensor] | None = None
        self.guidance_by_level: Callable[[Tensor], Tensor] | None = None
        self.guidance_off: Callable[[Tensor], Tensor] | None = None
        self._views: list[Callable[[], AbstractContextManager]] = []
        denoiser.eval()
        denoiser.requires_grad_(False)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        adapter: str | BackboneAdapter = "custom",
        guidance_scale: float = 1.0,
        null_cond: Conditioning | None = None,
    ) -> Teacher:
        """A custom teacher from any module: ``module(x, timestep, **cond.extra)`` by default."""
        return cls(Denoiser(module, schedule, prediction_type, adapter), guidance_scale, None, null_cond, "custom")

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    def add_view(self, view: Callable[[], AbstractContextManager]) -> None:
        """Run every later teacher forward inside ``view()`` as well.

        For students that change the teacher's own module: ``Student.lora`` adds "LoRA adapters disabled", AGD
        "AGD adapters disabled", a hooked guidance embedding "embedding disabled". Views compose: ``view()`` enters
        them in the order they were added.

        Args:
            view: a factory of a fresh context manager (e.g. ``lambda: adapters_disabled(backbone)``).
        """
        self._views.append(view)

    @contextmanager
    def view(self) -> Iterator[None]:
        """The context in which the denoiser is this teacher: every view of ``add_view``, entered in order (none:
        nothing to do). ``raw``, ``predict`` and ``sample`` use it; objectives that call ``teacher.denoiser``
        themselves enter it."""
        with ExitStack() as stack:
            for view in self._views:
                stack.enter_context(view())
            yield

    def uncond_like(self, cond: Conditioning) -> Conditioning | None:
        """The null conditioning repeated to ``cond``'s batch size (``None`` if the teacher has none)."""
        if self.null_cond is None:
            return None
        b = cond.batch_size or 1
        device = next((v.device for v in vars(cond).values() if isinstance(v, Tensor)), None)
        null = self.null_cond.repeat(b).to(device)
        # Per-sample inputs that are not "the prompt" are shared between branches (SDXL time_ids, Flux guidance, the
        # first frame of an image-to-video model).
        shared = null.replace(time_ids=cond.time_ids, guidance=cond.guidance, timestep_cond=cond.timestep_cond)
        return shared.with_image_of(cond)

    def raw(
        self,
        x: Tensor,
        tau: Tensor,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        guidance_scale: float | Tensor | None = None,
    ) -> Tensor:
        """Guided raw output. ``guidance_scale`` may be a ``[b]`` tensor (a different w per sample)."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        tau = torch.as_tensor(tau, dtype=torch.float32, device=x.device)
        tau = tau.expand(x.shape[0]) if tau.ndim == 0 else tau
        if guidance_scale is None and self.guidance_by_level is not None:
            w = self.guidance_by_level(tau)
        no_cfg = not isinstance(w, Tensor) and w == 1.0
        if self.guidance_off is not None and not no_cfg:  # w = 1 where the pipeline would not guide
            w = torch.where(self.guidance_off(tau), 1.0, torch.as_tensor(w, dtype=torch.float32, device=x.device))
        with torch.no_grad(), self.view():
            if no_cfg:
                return self.denoiser.raw(x, tau, cond).float()
            uncond = uncond if uncond is not None else self.uncond_like(cond)
            if uncond is None:
                raise ValueError("Guidance w != 1 needs an unconditional input: pass `uncond` or set `null_cond`.")
            both = self.denoiser.raw(torch.cat([x, x]), torch.cat([tau, tau]), Conditioning.cat([uncond, cond]))
            out_u, out_c = both.float().chunk(2)
            guided = out_u + bcast(torch.as_tensor(w, dtype=torch.float32), out_u) * (out_c - out_u)
            return guided if self.cfg_rescale is None else self.cfg_rescale(guided, out_c)

    def predict(
        self,
        x: Tensor,
        tau: Tensor,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        guidance_scale: float | Tensor | None = None,
    ) -> Prediction:
        """Guided ``(x̂0, ε̂)`` at ``(x_τ, τ)``, under ``no_grad`` with the teacher view active."""
        raw = self.raw(x, tau, cond, uncond, guidance_scale)
        return self.denoiser.to_prediction(raw, x.float(), tau)

    def sample(
        self,
        noise: Tensor,
        cond: Conditioning,
        taus: Tensor,
        uncond: Conditioning | None = None,
        guidance_scale: float | Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Deterministic multi-step sampling (DDIM for VP, Euler for flow) over the τ levels ``taus``.

        ``taus`` holds ``num_steps + 1`` levels from the start to the end (see ``fewstep.solvers.samplers`` for
        the grids that reproduce each diffusers scheduler).
        """
        from fewstep.solvers.samplers import sample_ddim

        return sample_ddim(
            lambda x, t: self.predict(x, t, cond, uncond, guidance_scale), self.schedule, noise, taus, progress
        )
