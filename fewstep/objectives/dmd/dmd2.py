"""DMD2 (Yin et al. 2024, arXiv 2405.14867) with Decoupled DMD as an option.

Roles: the generator is the student; the real score is the frozen teacher with CFG on the real branch only;
the fake score ``F_ψ`` starts as the teacher and learns to denoise the generator's samples. With a LoRA student all
three share one frozen base (``roles``): teacher = adapters off, student = adapter ``default``, fake = adapter
``fake``. Two-time-scale updates (TTUR): the trainer's ``phase(step)`` runs one generator step, then
``fake_steps_per_generator_step`` fake-score steps. Multi-step students use backward simulation by default.

One-step stabilisers (all off by default): ``dm_projection`` (projected DMD), ``real_cfg_normalize`` (the guided real
x0 at the conditional prediction's norm) and ``dm_timestep_shift`` / ``fake_timestep_shift`` (extra static flow shift
of the noise levels).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fewstep.models.backbones import num_tokens
from fewstep.models.conditioning import Conditioning
from fewstep.models.student import Student
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.noise.convert import rescale_to_norm
from fewstep.noise.schedules import FlowSchedule
from fewstep.objectives.dmd import functional as Fn
from fewstep.objectives.dmd.gan import GANHead, head_for, tap
from fewstep.objectives.dmd.health import health_metrics, sample_stats
from fewstep.objectives.dmd.roles import fake_role, student_role
from fewstep.objectives.dmd.sampler import DMDSampler, dmd_pipeline_scheduler, dmd_sampling_spec
from fewstep.objectives.protocol import OBJECTIVES, BackboneUse, Batch, LossOutput, StudentWriter
from fewstep.objectives.spec import SamplingSpec
from fewstep.solvers.grids import teacher_taus
from fewstep.solvers.steps import noise_to, renoise_step


class DMD2Config(BaseModel):
    """Recipe block of the ``dmd2`` objective (defaults: DMD2's code and experiment scripts).

    Guidance: ``real_guidance_scale`` is the Imagen ``w`` of the teacher (w = 1 is none; SD1.5 1.75, SDXL 8 in
    DMD2). The fake score is never guided. The student is sampled without CFG (guidance_scale 1).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["dmd2"] = "dmd2"
    num_student_steps: int = Field(1, ge=1, description="sampling steps of the student (SDXL 4-step: 4)")
    backward_simulation: bool | None = Field(None, description="None: on for multi-step students")
    real_guidance_scale: float = Field(1.75, ge=1.0, description="Imagen w of the teacher (real) branch")
    fake_steps_per_generator_step: int = Field(5, ge=1, description="TTUR ratio r (SD1.5 10, SDXL 5)")
    min_step_percent: float = Field(0.02, ge=0.0, le=1.0, description="DM-gradient noise levels: lower end")
    max_step_percent: float = Field(0.98, ge=0.0, le=1.0, description="DM-gradient noise levels: upper end")
    fake_score: Literal["lora", "full"] | None = Field(None, description="None: lora for a LoRA student, else full")
    fake_lora_rank: int | None = Field(None, ge=1, description="None: the student's rank")
    fake_lora_alpha: float | None = Field(None, gt=0, description="None: the student's alpha")
    gan_weight: float = Field(0.0, ge=0.0, description="generator GAN weight (SD1.5 1e-3, SDXL 5e-3); 0 = no GAN")
    gan_d_weight: float = Field(1e-2, ge=0.0, description="discriminator loss weight, added to the fake loss")
    gan_feature_module: str | None = Field(None, description="module whose output the GAN head reads")
    gan_head_width: int = Field(256, ge=8)
    regression_weight: float = Field(0.0, ge=0.0, description="DMD1 regression on teacher ODE pairs (0.25 in DMD1)")
    regression_ode_steps: int = Field(25, ge=1, description="teacher steps that make one regression pair")
    decoupled: bool = Field(False, description="Decoupled DMD: separate DM and CFG-augmentation terms")
    dm_weight: float = Field(1.0, ge=0.0, description="Decoupled DMD: weight of the DM term")
    ca_weight: float = Field(1.0, ge=0.0, description="Decoupled DMD: weight of the CFG-augmentation term")
    ca_min_step_percent: float = Field(0.02, ge=0.0, le=1.0)
    ca_max_step_percent: float = Field(0.98, ge=0.0, le=1.0)
    health_reference_steps: int = Field(16, ge=0, description="teacher steps for the reference stats; 0 = off")
    resolution: int | None = Field(None, ge=8, description="pixel size for data-free batches (default: pipeline's)")
    sync_seed: int = Field(0, description="seed of the rank-synchronised backward-simulation depth")
    dm_projection: Literal["none", "radial"] = Field(
        "none", description="radial: remove g's per-sample component along the centred sample (projected DMD)"
    )
    real_cfg_normalize: bool = Field(False, description="guided real x0 rescaled to the conditional x0's norm")
    dm_timestep_shift: float | None = Field(
        None, gt=0, description="flow teachers: extra static shift k of the DM (and CA) noise levels; None = off"
    )
    fake_timestep_shift: float | None = Field(
        None, gt=0, description="flow teachers: extra static shift k of the fake score's denoising levels"
    )


def check_teacher(teacher: Teacher, what: str = "DMD") -> None:
    if teacher.schedule.kind not in ("vp", "flow"):
        raise ValueError(
            f"{what} needs a VP (eps / v / x0) or flow (velocity) teacher; got a {teacher.schedule.kind!r} schedule."
        )


def check_timestep_shifts(teacher: Teacher, config: DMD2Config) -> None:
    """The extra level shifts warp a flow time ``s``; a VP teacher has integer timesteps, not a shift to add to."""
    for key in ("dm_timestep_shift", "fake_timestep_shift"):
        if getattr(config, key) is not None and teacher.schedule.kind != "flow":
            raise ValueError(
                f"objective.{key} is a static flow shift and needs a flow teacher; this teacher has a "
                f"{teacher.schedule.kind!r} schedule: remove {key} (or set it to null), or narrow the VP levels with "
                "min_step_percent / max_step_percent instead."
            )


def sample_levels(
    teacher: Teacher,
    n: int,
    lo: float,
    hi: float,
    num_tokens: int | None,
    device: Any,
    extra_shift: float | None = None,
) -> Tensor:
    """``n`` noise levels τ: VP integer timesteps ``U{⌊lo·N⌋ … ⌊hi·N⌋}``; flow ``shift(U[lo, hi])``.

    ``extra_shift`` (flow only): a further static shift ``k`` on top of the teacher's own (SD3's
    ``s' = k·s / (1 + (k − 1)·s)``, ``FlowSchedule.shift``); ``k > 1`` moves the levels towards noise.
    """
    schedule = teacher.schedule
    if schedule.kind == "vp":
        if extra_shift is not None:
            raise ValueError("A timestep shift needs a flow teacher; this one is VP (use the *_step_percent range).")
        n_train = schedule.num_train_timesteps
        low, high = int(lo * n_train), max(int(hi * n_train), int(lo * n_train) + 1)
        t = torch.randint(low, min(high, n_train), (n,))
        return schedule.tau_from_model_timestep(t).to(device)
    tau = schedule.shift(lo + (hi - lo) * torch.rand(n), num_tokens)
    if extra_shift is not None:
        tau = FlowSchedule(shift_factor=extra_shift).shift(tau)
    return tau.clamp(1e-4, 1.0).to(device)


class FakeScore(nn.Module):
    """The fake score's trainable group: its denoiser (an adapter role or a full copy) plus the optional GAN head.

    ``forward(x, τ, cond, num_classify)`` returns the prediction and, for the last ``num_classify`` rows, the
    head's logits on the bottleneck features (one forward, so DDP sees one graph per step).
    """

    def __init__(self, core: nn.Module, head: GANHead | None = None, feature_module: str | None = None) -> None:
        super().__init__()
        self.core, self.head, self.feature_module = core, head, feature_module

    def forward(self, x: Tensor, tau: Tensor, cond: Conditioning, num_classify: int = 0) -> tuple[Any, Tensor | None]:
        if num_classify == 0 or self.head is None:
            return self.core(x, tau, cond), None
        features: list[Tensor] = []
        with tap(self.core.denoiser.backbone.get_submodule(self.feature_module), features):
            pred = self.core(x, tau, cond)
        return pred, self.head(features[-1][-num_classify:])


@OBJECTIVES.register("dmd2")
class DMD2:
    """DMD2 distillation of a VP or flow teacher into a 1- or K-step student.

    Args:
        config: the ``objective`` recipe block.
        teacher: the frozen teacher (real score).
        student: the generator: full, or a LoRA on the teacher's base (then teacher and fake score share that base).
    """

    Config = DMD2Config
    bypasses_prepared = False

    def __init__(self, config: DMD2Config, teacher: Teacher, student: Student) -> None:
        check_teacher(teacher, "DMD2")
        check_timestep_shifts(teacher, config)
        self.config, self.teacher, self.student, self.schedule = config, teacher, student, teacher.schedule
        kind = config.fake_score or ("lora" if student.is_lora else "full")
        lora = student.lora_config
        rank = config.fake_lora_rank or (lora.r if lora is not None else 64)
        alpha = config.fake_lora_alpha or (lora.lora_alpha if lora is not None else None)
        core = fake_role(student, teacher, kind, rank, alpha)
        head, feature_module = None, None
        if config.gan_weight > 0:
            feature_module, head = head_for(core.denoiser.backbone, config.gan_feature_module, config.gan_head_width)
        self.fake = FakeScore(core, head, feature_module)
        for p in self.fake.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.generator = student_role(student, shared_fake=kind == "lora")
        self._gen: nn.Module = self.generator  # prepared (DDP) views, set by attach()
        self._fake: nn.Module = self.fake
        self.reference: dict[str, float] | None = None

    # --- protocol -----------------------------------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.generator, "fake_score": self.fake}

    def attach(self, prepared: dict[str, nn.Module]) -> None:
        self._gen, self._fake = prepared["student"], prepared["fake_score"]

    def auxiliary(self) -> dict[str, nn.Module]:
        return {}

    def backbone_use(self) -> dict[str, BackboneUse]:
        """For ``fewstep plan``: the generator's forward (twice the batch with regression pairs) plus, with the GAN,
        the frozen fake score's classify-mode forward, both kept for one backward, next to the teacher's guided
        forward on ``[uncond, cond]``; the fake score's one forward over ``[x_t, x_fake, x_real]`` (3×) with the GAN,
        else over ``x_t``, after the generator's forward without gradients."""
        cfg, gan = self.config, self.config.gan_weight > 0
        cfg_batch = 2.0 if cfg.real_guidance_scale != 1.0 and not cfg.decoupled else 1.0
        student = (2.0 if cfg.regression_weight > 0 else 1.0) + (1.0 if gan else 0.0)
        fake = 3.0 if gan else 1.0
        return {"student": BackboneUse(student, cfg_batch), "fake_score": BackboneUse(fake, 1.0)}

    def prepare(self, batches: Iterator[Batch]) -> None:
        """Nothing to prepare."""

    def phase(self, step: int) -> str:
        """TTUR: one generator step, then ``r`` fake-score steps (DMD2 updates G when ``iter % r == 0``)."""
        return "student" if step % (self.config.fake_steps_per_generator_step + 1) == 0 else "fake_score"

    def loss(self, batch: Batch, step: int, phase: str) -> LossOutput:
        if self.config.gan_weight > 0 and batch.x0 is None:
            raise ValueError(
                "objective.gan_weight > 0 needs real data x0 for the diffusion GAN's real branch: use an image, latent "
                "or digits dataset (data.source), or set gan_weight: 0."
            )
        shape, device = self.sample_shape(batch)
        cond = batch.cond
        uncond = batch.uncond if batch.uncond is not None else self.teacher.uncond_like(cond)
        if self.reference is None and self.config.health_reference_steps > 0:
            self.reference = self.teacher_reference(shape, device, cond, uncond)
        if phase == "student":
            return self.generator_loss(batch, cond, uncond, shape, device, step)
        return self.fake_loss(batch, cond, shape, device, step)

    def on_step_end(self, step: int, phase: str) -> None:
        return None

    def sampler(self) -> DMDSampler:
        pipeline_scheduler = dmd_pipeline_scheduler(self.teacher, self.config.num_student_steps)
        return DMDSampler(self.student.denoiser, self.schedule, self.teacher.family, pipeline_scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference} if self.reference is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference", self.reference)

    def sampling_spec(self, steps: tuple[int, ...] = (1, 2, 4, 8)) -> SamplingSpec:
        """The student's sampling schedule (``SamplingSpec``): LCMScheduler on DMD2's timesteps (VP) or the flow
        re-noise scheduler, at guidance scale 1."""
        steps = tuple(sorted({*steps, self.config.num_student_steps}))
        note = f"trained with teacher CFG w = {self.config.real_guidance_scale} on the real branch only"
        return dmd_sampling_spec(self.teacher, "dmd2", steps, self.config.num_student_steps, note)

    def export_extra(self, out_dir: Path, write_student: StudentWriter) -> None:
        """Nothing beyond the student."""

    # --- pieces ------------------------------------------------------------------------------------------------

    def sample_shape(self, batch: Batch) -> tuple[tuple[int, ...], Any]:
        """The generator's sample shape ``[b, ...]``: the data's, or the teacher's latent shape for prompts."""
        if batch.x0 is not None:
            return tuple(batch.x0.shape), batch.x0.device
        b = batch.cond.batch_size
        if b is None:
            raise ValueError("DMD2 needs a batch size: give data with x0 or conditioning (prompts, class labels).")
        if self.teacher.pipeline is None:
            raise ValueError(
                "A custom teacher has no latent shape to draw noise for: give the data as x0 (data.source: tensors) "
                "so DMD2 can take the sample shape from it."
            )
        from fewstep.models.backbones import latent_shape

        device = next(self.teacher.denoiser.backbone.parameters()).device
        return latent_shape(self.teacher, b, self.config.resolution), device

    def student_taus(self, shape: tuple[int, ...]) -> Tensor:
        return self.sampler().timesteps(self.config.num_student_steps, shape)  # the sampler's grid (dmd_student_grid)

    def generator_input(self, batch: Batch, cond: Conditioning, shape: tuple[int, ...], device: Any, step: int):
        """``(x_in, τ_in)`` of the graded generator step (DMD2 ``sample_backward``).

        1-step: pure noise at ``τ_0``. K-step with backward simulation: ``k`` (synchronised across ranks) no-grad
        student steps from pure noise, each predicting x̂0 and re-noising to the next level with fresh noise.
        Without it: real data ``x0`` forward-noised to ``τ_k`` (DMD2's "denoising on real data" mode).
        """
        taus = self.student_taus(shape).to(device)
        k = Fn.backsim_depth(step, self.config.sync_seed, len(taus))
        x = torch.randn(shape, device=device)
        backsim = self.config.backward_simulation is not False
        if k > 0 and backsim:
            with torch.no_grad():
                for i in range(k):
                    x0 = self.student.denoiser(x, taus[i].expand(shape[0]), cond).x0
                    x = renoise_step(self.schedule, x0, taus[i + 1].expand(shape[0]), torch.randn_like(x0))
        elif k > 0:
            if batch.x0 is None:
                raise ValueError("backward_simulation=false trains on forward-noised real data: the batch needs x0.")
            x = noise_to(self.schedule, batch.x0.float(), x, taus[k].expand(shape[0]))
        return x, taus[k].expand(shape[0])

    def generate(self, batch: Batch, cond: Conditioning, shape: tuple[int, ...], device: Any, step: int) -> Tensor:
        """Generator samples without gradients (for the fake score)."""
        with torch.no_grad():
            x_in, tau_in = self.generator_input(batch, cond, shape, device, step)
            return self.student.denoiser(x_in, tau_in, cond).x0.float()

    def real_fake_x0(self, x_t: Tensor, tau: Tensor, cond: Conditioning, uncond: Conditioning | None, w: float):
        """``(x̂0_real with CFG w, x̂0_fake without CFG)`` at ``(x_t, τ)``, no gradients.

        With ``real_cfg_normalize`` (and ``w ≠ 1``) the guided x̂0_real is rescaled per sample to the norm of the
        conditional x̂0 (true-CFG rescale in x0 space): CFG keeps its direction but can no longer inflate the
        prediction. A teacher that already renormalises its guided output (``teacher.cfg_rescale``, Qwen-Image) is
        left as it is: its own rescale is the one applied, never both.
        """
        with torch.no_grad():
            if self.config.real_cfg_normalize and w != 1.0 and self.teacher.cfg_rescale is None:
                real = self.normalized_real_x0(x_t, tau, cond, uncond, w)
            else:
                real = self.teacher.predict(x_t, tau, cond, uncond, guidance_scale=w).x0
            fake = self.fake.core(x_t, tau, cond).x0.float()
        return real, fake

    def normalized_real_x0(self, x_t: Tensor, tau: Tensor, cond: Conditioning, uncond: Conditioning | None, w: float):
        """Guided x̂0 at the conditional x̂0's per-sample norm, from the two unguided branches (the same 2·b rows as
        one guided call): ``x̂0_cfg = x̂0_c − (w − 1)·(x̂0_∅ − x̂0_c)`` (the CA identity), then ``rescale_to_norm``."""
        uncond = uncond if uncond is not None else self.teacher.uncond_like(cond)
        if uncond is None:
            raise ValueError("real_cfg_normalize with real_guidance_scale != 1 needs an unconditional input.")
        x0_c = self.teacher.predict(x_t, tau, cond, guidance_scale=1.0).x0.float()
        x0_u = self.teacher.predict(x_t, tau, uncond, guidance_scale=1.0).x0.float()
        guided = x0_c - Fn.ca_gradient(x0_u, x0_c, w)
        return rescale_to_norm(guided.flatten(1), x0_c.flatten(1), dim=1, min_norm=1e-12).reshape(guided.shape)

    def dm_direction(self, x: Tensor, cond: Conditioning, uncond: Conditioning | None) -> tuple[Tensor, dict]:
        """The generator's gradient ``g`` at sample ``x``: normalised DM, or Decoupled DMD's weighted DM + CA
        terms with separate noise levels."""
        cfg, b, k = self.config, x.shape[0], self.config.dm_timestep_shift
        ntok = num_tokens(self.teacher.denoiser, x.shape)
        tau = sample_levels(self.teacher, b, cfg.min_step_percent, cfg.max_step_percent, ntok, x.device, k)
        x_t = noise_to(self.schedule, x.detach(), torch.randn_like(x), tau)
        if not cfg.decoupled:
            real, fake = self.real_fake_x0(x_t, tau, cond, uncond, cfg.real_guidance_scale)
            g, metrics = self.projected(Fn.dm_gradient(fake, real, x.detach()), x, {})
            return g, {"dm_grad_norm": float(g.flatten(1).norm(dim=1).mean()), **metrics}
        real_c, fake = self.real_fake_x0(x_t, tau, cond, uncond, 1.0)
        g_dm = Fn.dm_gradient(fake, real_c, x.detach())
        tau_ca = sample_levels(self.teacher, b, cfg.ca_min_step_percent, cfg.ca_max_step_percent, ntok, x.device, k)
        x_ca = noise_to(self.schedule, x.detach(), torch.randn_like(x), tau_ca)
        if uncond is None:
            raise ValueError("decoupled: true needs an unconditional input for the CFG-augmentation term.")
        real_c2 = self.teacher.predict(x_ca, tau_ca, cond, guidance_scale=1.0).x0
        real_u2 = self.teacher.predict(x_ca, tau_ca, uncond, guidance_scale=1.0).x0
        w = cfg.real_guidance_scale
        g_ca = Fn.ca_gradient(real_u2, real_c2, w) / Fn.per_sample_l1(x.detach() - (real_u2 + w * (real_c2 - real_u2)))
        g = cfg.dm_weight * g_dm + cfg.ca_weight * torch.nan_to_num(g_ca)
        metrics = {"dm_grad_norm": float(g_dm.flatten(1).norm(dim=1).mean())}
        metrics["ca_grad_norm"] = float(g_ca.flatten(1).norm(dim=1).mean())
        return self.projected(g, x, metrics)

    def projected(self, g: Tensor, x: Tensor, metrics: dict) -> tuple[Tensor, dict]:
        """``dm_projection: radial``: ``g`` without its component along the centred sample (``Fn.project_radial``);
        logs the removed part's mean per-sample norm as ``dm_radial_norm``."""
        if self.config.dm_projection == "none":
            return g, metrics
        g_proj = Fn.project_radial(g, x.detach())
        return g_proj, {**metrics, "dm_radial_norm": float((g - g_proj).flatten(1).norm(dim=1).mean())}

    def generator_loss(self, batch, cond, uncond, shape, device, step) -> LossOutput:
        """``L_G = 0.5·mse(x, sg(x − g))`` (+ GAN, + DMD1 regression) through the prepared generator."""
        cfg, b = self.config, shape[0]
        x_in, tau_in = self.generator_input(batch, cond, shape, device, step)
        gen_cond = cond
        if cfg.regression_weight > 0:  # one forward for [graded input, regression noise at τ_0]
            z = torch.randn(shape, device=device)
            tau0 = self.student_taus(shape)[0].to(device).expand(b)
            x_in, tau_in, gen_cond = torch.cat([x_in, z]), torch.cat([tau_in, tau0]), Conditioning.cat([cond, cond])
        out = self._gen(x_in, tau_in, gen_cond).x0.float()
        x = out[:b]
        g, metrics = self.dm_direction(x, cond, uncond)
        loss_dm = Fn.injected_loss(x, g)
        loss = loss_dm
        metrics["loss_dm"] = float(loss_dm.detach())
        if cfg.gan_weight > 0:
            loss_g = self.gan_generator_loss(x, cond)
            loss = loss + cfg.gan_weight * loss_g
            metrics["loss_gan_g"] = float(loss_g.detach())
        if cfg.regression_weight > 0:
            with torch.no_grad():
                taus = teacher_taus(self.schedule, cfg.regression_ode_steps, num_tokens(self.teacher.denoiser, shape))
                taus = taus.to(device)
                y = self.teacher.sample(z, cond, taus, uncond, cfg.real_guidance_scale)
            loss_reg = torch.nn.functional.mse_loss(out[b:], y.float())
            loss = loss + cfg.regression_weight * loss_reg
            metrics["loss_regression"] = float(loss_reg.detach())
        metrics.update(health_metrics(x, self.reference))
        return LossOutput(loss, {"loss_generator": float(loss.detach()), **metrics})

    def gan_generator_loss(self, x: Tensor, cond: Conditioning) -> Tensor:
        """``softplus(−D(F.features(noise(x, t_gan))))`` with the fake score and head frozen: the gradient reaches
        the generator only (DMD2 sets ``guidance.requires_grad_(False)`` in the generator turn)."""
        tau = sample_levels(self.teacher, x.shape[0], 0.0, 1.0, num_tokens(self.teacher.denoiser, x.shape), x.device)
        x_t = noise_to(self.schedule, x, torch.randn_like(x), tau)
        params = [p for p in self.fake.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            _, logits = self.fake(x_t, tau, cond, num_classify=x.shape[0])  # unwrapped: no DDP reducer involved
        finally:
            for p in params:
                p.requires_grad_(True)
        return Fn.gan_g_loss(logits)

    def fake_loss(self, batch, cond, shape, device, step) -> LossOutput:
        """Denoising on the generator's samples over the full noise range (+ λ_D·GAN discriminator loss)."""
        cfg, b = self.config, shape[0]
        x = self.generate(batch, cond, shape, device, step)
        ntok = num_tokens(self.teacher.denoiser, shape)
        tau = sample_levels(self.teacher, b, 0.0, 1.0, ntok, device, cfg.fake_timestep_shift)
        eps = torch.randn_like(x)
        inputs, taus, conds = [noise_to(self.schedule, x, eps, tau)], [tau], [cond]
        gan = cfg.gan_weight > 0
        if gan:
            tau_f, tau_r = (sample_levels(self.teacher, b, 0.0, 1.0, ntok, device) for _ in range(2))
            inputs += [noise_to(self.schedule, x, torch.randn_like(x), tau_f)]
            inputs += [noise_to(self.schedule, batch.x0.float(), torch.randn_like(x), tau_r)]
            taus += [tau_f, tau_r]
            conds += [cond, cond]
        pred, logits = self._fake(torch.cat(inputs), torch.cat(taus), Conditioning.cat(conds), 2 * b if gan else 0)
        a, s = self.schedule.alpha(tau).to(device), self.schedule.sigma(tau).to(device)
        loss_fake = Fn.denoising_loss(pred.x0[:b], pred.eps[:b], x, eps, a, s, self.fake.core.denoiser.prediction_type)
        loss, metrics = loss_fake, {"loss_fake": float(loss_fake.detach())}
        if gan:
            loss_d = Fn.gan_d_loss(logits[:b], logits[b:])
            loss = loss + cfg.gan_d_weight * loss_d
            metrics.update(loss_gan_d=float(loss_d.detach()), d_real_acc=float((logits[b:] > 0).float().mean()))
            metrics["d_fake_acc"] = float((logits[:b] < 0).float().mean())
        metrics.update(health_metrics(x, self.reference))
        return LossOutput(loss, metrics)

    def teacher_reference(self, shape, device, cond, uncond) -> dict[str, float]:
        """Mean, std and diversity of the teacher's own samples (``health_reference_steps`` steps, CFG
        ``real_guidance_scale``): the reference point of the drift metrics."""
        taus = teacher_taus(self.schedule, self.config.health_reference_steps, num_tokens(self.teacher.denoiser, shape))
        with torch.no_grad():
            x = self.teacher.sample(torch.randn(shape, device=device), cond, taus.to(device), uncond,
                                    self.config.real_guidance_scale)  # fmt: skip
        return sample_stats(x)

    def recommended_guidance_scale(self) -> float:
        return 1.0

    guidance_convention = GUIDANCE_CONVENTION
