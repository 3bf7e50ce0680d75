"""The one training loop: accelerate, one AdamW per trainable group, phases, accumulation, clipping, EMA,
step guard, checkpoints with exact resume, signals, scalars, sample grids and periodic evaluation
(``eval.every_steps``: through the ``evaluator`` factory given to ``train``, e.g.
``fewstep.eval.periodic.periodic_evaluator``; best checkpoint in ``checkpoints/best``).

Before the first step: the output directory is locked for this run (``fewstep.train.lock``), a checkpoint is loaded
(``train.resume``) and the recipe's optimizer settings replace the saved ones; then ``objective.prepare(batches)``.
Per step: ``phase = objective.phase(step)``; ``gradient_accumulation_steps`` micro-batches of
``objective.loss(batch, step, phase)`` are backpropagated; the phase's optimizer clips, steps, and zero-grads its
group (and the group's ``objective.auxiliary()`` module) only; EMA and ``objective.on_step_end`` follow.

The guard: a non-finite loss (on any rank) or gradient skips the update; an update that leaves a weight non-finite or
above ``train.max_weight_abs`` is undone (``train.rollback``). More than ``train.max_nonfinite`` such steps in a row
stop the run (``TrainingStopped``). Every save checks the weights and EMA shadows first and refuses bad ones, so a
checkpoint never holds them. Any other exception in the loop first writes an emergency checkpoint of the last
complete step (one process, weights good), then propagates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewstep.config.checks import input_issues
from fewstep.config.errors import RecipeError, RunFailedError
from fewstep.data.loader import build_batches
from fewstep.models.teacher import Teacher
from fewstep.train.build import Components, build_components
from fewstep.train.checkpoint import (
    checkpoint_dir,
    checkpoint_fingerprint,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    trainable_state,
)
from fewstep.train.ema import EMA, trainable_parameters
from fewstep.train.evaluator import EvaluatorFactory, PeriodicEvaluator
from fewstep.train.lock import RunLock, check_launch, claim_on_main
from fewstep.train.logging import (
    PROJECT,
    TrainingLog,
    flatten_metrics,
    learning_rates,
    tracker_init_kwargs,
    write_samples,
)
from fewstep.train.optim import (
    StepRollback,
    WeightCheck,
    apply_hyperparameters,
    build_optimizers,
    build_schedulers,
    weights_problem,
)
from fewstep.train.sharding import (
    clip_grad_norm,
    device_mesh,
    fsdp_layout,
    full,
    local,
    rebind,
    shard_roots,
    sharding_roots,
)
from fewstep.train.sync import average_gradients, check_engine, check_strategy

if TYPE_CHECKING:
    from accelerate import Accelerator

    from fewstep.config.schema import Recipe

logger = logging.getLogger(__name__)

SUMMARY = "run_summary.json"
_ADVICE = (
    "Try a lower optim.lr, optim.grad_clip (e.g. 1.0), train.mixed_precision=no (fp32), or check the data for NaN/inf "
    "values; train.resume=auto continues from the newest checkpoint."
)
NO_EVALUATOR = (
    "eval.every_steps={every} is set, but train() was called without an evaluator: this run does no periodic "
    "evaluation (no eval/ scalars or reports, no checkpoints/best). Pass "
    "`evaluator=fewstep.eval.periodic.periodic_evaluator` to train(), or train with `fewstep train`, which does."
)


class TrainingStopped(RunFailedError):
    """The run stopped because its weights went bad (too many bad steps in a row, a bad update that cannot be undone,
    a save refused); nothing non-finite or exploded was saved. ``fewstep train`` exits with status 1."""


def make_accelerator(recipe: Recipe) -> Accelerator:
    """``Accelerator`` from the recipe (DDP/FSDP/DeepSpeed come from ``accelerate launch``'s own config); a
    ``train.log_with`` tracker that is not installed is a ``RecipeError`` (accelerate would skip it silently)."""
    from accelerate import Accelerator

    from fewstep.config.checks import tracker_issues

    issues = tracker_issues(recipe.train.log_with)
    if issues:
        raise RecipeError(issues)
    return Accelerator(
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        mixed_precision=recipe.train.mixed_precision,
        log_with=list(recipe.train.log_with),
        project_dir=str(recipe.output_dir),
    )


def train(
    recipe: Recipe,
    accelerator: Accelerator | None = None,
    teacher: Teacher | None = None,
    evaluator: EvaluatorFactory | None = None,
) -> Path:
    """Train ``recipe`` and return its run directory (``recipe.output_dir``).

    Resumes from ``train.resume`` (``auto``: the newest complete checkpoint of the run). SIGTERM/SIGINT finish the
    current step and write a checkpoint; then SIGTERM returns normally and SIGINT (Ctrl-C) raises
    ``KeyboardInterrupt``, as Ctrl-C does anywhere in Python (``fewstep train`` exits with status 130). The files the
    recipe names (data, a local teacher, a resume path, the output directory) are checked before anything loads.

    Args:
        recipe: a validated ``fewstep.config.schema.Recipe``.
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from ``recipe.train``).
        teacher: a ready ``Teacher`` (e.g. ``Teacher.from_module``) instead of loading ``recipe.teacher``.
        evaluator: builds the periodic evaluation of ``eval.every_steps``
            (``fewstep.eval.periodic.periodic_evaluator``); without one, a recipe that sets ``eval.every_steps``
            trains with a warning and no evaluation.
    """
    from accelerate.utils import set_seed

    issues = input_issues(recipe, teacher=teacher is None)  # a missing data path fails now, not after the teacher loads
    if issues:
        raise RecipeError(issues)
    accelerator = accelerator if accelerator is not None else make_accelerator(recipe)
    check_launch(accelerator)  # before the teacher loads: a bad launch or a taken output_dir fails at once
    check_engine(accelerator)
    run_lock = claim_on_main(recipe.output_dir, recipe.train.resume, recipe.train.overwrite, accelerator)
    try:
        set_seed(recipe.train.seed)  # the same on every rank: identical initial weights (LoRA init, heads)
        if teacher is None and recipe.data.source == "cache":  # no text encoders or VAE: the cache holds their outputs
            from fewstep.data.cache import load_cached_teacher

            teacher = load_cached_teacher(recipe)
        components = build_components(recipe, teacher=teacher)
        trainer = Trainer(recipe, accelerator, components, evaluator, run_lock=run_lock)
    except BaseException:
        run_lock.release()
        raise
    return trainer.fit()


class Trainer:
    """The state of one run. ``fit()`` trains to ``train.max_steps`` (or until a signal) and returns the run dir.

    Args:
        recipe: a validated ``Recipe``.
        accelerator: the run's ``Accelerator``.
        components: teacher, student and objective (``build_components``).
        evaluator: builds the periodic evaluation (as for ``train``).
        run_lock: the output directory's lock when the caller took it already (``train`` does, before the teacher
            loads; ``fewstep.train.lock.claim_on_main``); otherwise the trainer takes it. ``fit`` releases it, and so
            does ``release_run_dir`` for a trainer that is never fitted.
    """

    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        components: Components,
        evaluator: EvaluatorFactory | None = None,
        run_lock: RunLock | None = None,
    ) -> None:
        from accelerate.utils import set_seed

        self.recipe, self.acc, self.cfg = recipe, accelerator, recipe.train
        check_launch(accelerator)
        self.run_dir = Path(recipe.output_dir)
        self.teacher, self.objective = components.teacher, components.objective
        self.teacher.denoiser.to(accelerator.device)
        if self.teacher.pipeline is not None and hasattr(self.teacher.pipeline, "to"):
            self.teacher.pipeline.to(accelerator.device)

        self.groups: dict[str, nn.Module] = self.objective.trainable()  # unwrapped
        self.auxiliary = self._auxiliary_modules()  # never wrapped; trained by their group's optimizer
        self.layout = fsdp_layout(self.cfg.fsdp, accelerator)
        check_strategy(self.objective, accelerator, sharded_by_fewstep=self.layout is not None)
        if self.layout is not None:  # FSDP2: every backbone sharded here, before the optimizers see the weights
            roots = sharding_roots(self.groups, self.teacher.denoiser.backbone)
            rebind(list(self.groups.values()), shard_roots(roots, self.layout, device_mesh(self.layout, accelerator)))
        optimizers = build_optimizers(self.groups, recipe.optim, self.auxiliary)
        self.schedulers = build_schedulers(optimizers, recipe.optim, self.cfg.max_steps)
        names = list(self.groups)
        if self.layout is None:
            prepared = accelerator.prepare(*self.groups.values(), *optimizers.values())
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            self.modules = dict(zip(names, prepared[: len(names)]))
            self.optimizers = dict(zip(names, prepared[len(names) :]))
        else:  # sharded modules need no wrapper: FSDP's hooks are on the modules themselves
            self.modules, self.optimizers = dict(self.groups), optimizers
        self.objective.attach(self.modules)
        # what each optimizer steps (its group and the group's auxiliary module): checked after every update; the
        # checks and the rollback copy see this rank's shard of sharded weights
        stepped = {n: [local(p) for g in o.param_groups for p in g["params"]] for n, o in self.optimizers.items()}
        self._checks = {n: WeightCheck(params) for n, params in stepped.items()}
        self._rollbacks = {n: StepRollback(params) for n, params in stepped.items()} if self.cfg.rollback else {}
        # what each group's optimizer updates, listed once for clipping (a walk over a large backbone costs ms a step)
        self._clip_params = {
            name: [
                *trainable_parameters(m).values(),
                *trainable_parameters(self.auxiliary.get(name, nn.Module())).values(),
            ]
            for name, m in self.modules.items()
        }
        self.ema: EMA | None = None
        self.auxiliary_ema: EMA | None = None  # the auxiliary modules' shadows: checkpointed, never applied
        if self.cfg.ema_decay is not None:
            self.ema = EMA(self.groups, self.cfg.ema_decay, self.cfg.ema_warmup)
            if self.auxiliary:
                self.auxiliary_ema = EMA(self.auxiliary, self.cfg.ema_decay, self.cfg.ema_warmup)

        self.step, position, self.nonfinite_steps = 0, 0, 0
        self.bad_streak = 0  # bad steps in a row (loss, gradient or weights)
        self._in_step = self._updating = self._saving = False  # where a failure happened (emergency checkpoint)
        self._run_lock: RunLock | None = run_lock  # taken before anything reads or sweeps the directory
        if run_lock is None:
            self._run_lock = claim_on_main(self.run_dir, self.cfg.resume, self.cfg.overwrite, accelerator)
        try:
            self.resumed_from = resolve_resume(self.run_dir, self.cfg.resume)
            if self.resumed_from is not None:
                position = self._load(self.resumed_from)
                self._apply_recipe_hyperparameters()
            else:
                set_seed(self.cfg.seed + accelerator.process_index)  # per-rank noise from here on
            self.batches = build_batches(recipe.data, self.teacher, accelerator, position, seed=self.cfg.seed)
            self.objective.prepare(self.batches)  # one-time work (TBCM's rollouts), after the resume
            self._stop_requested = False  # set by a signal on this rank
            self._signal: int | None = None  # which one: SIGINT ends fit() with KeyboardInterrupt after the checkpoint
            self._stop = False  # the same on every rank: set when any rank got a signal
            self._last_saved = self.step if self.resumed_from is not None else -1
            self.periodic = self._build_evaluator(evaluator, components)
            self.tracking = TrainingLog(accelerator, recipe, self.teacher)  # scalars, images, alarms
        except BaseException:
            self.release_run_dir()
            raise

    # --- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> Path:
        acc = self.acc
        try:
            if acc.is_main_process:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_resolved_config(self.recipe, self.run_dir / "resolved_config.yaml")
            acc.init_trackers(PROJECT, init_kwargs=tracker_init_kwargs(self.recipe))
            fixed = self._fixed_sample_inputs()
            restore = self._install_signal_handlers()
            bar = tqdm(
                total=self.cfg.max_steps,
                initial=self.step,
                desc="train",
                disable=not (acc.is_main_process and self.cfg.progress),
            )
            try:
                self._loop(fixed, bar)
                if self.bad_streak and not self._stop:
                    raise TrainingStopped(
                        f"The run reached train.max_steps={self.cfg.max_steps} with its last {self.bad_streak} steps "
                        f"bad, so step {self.step} is not saved; the newest checkpoint is "
                        f"{latest_checkpoint(self.run_dir) or 'none'}. {_ADVICE}"
                    )
                self.save_verified()  # the final one (or the one a signal asked for); skipped if saved already
                if self._stop and acc.is_main_process:
                    saved = self._last_saved == self.step
                    newest = checkpoint_dir(self.run_dir, self.step) if saved else latest_checkpoint(self.run_dir)
                    _say(f"Stopped by a signal after step {self.step}; the newest checkpoint is {newest}")
                self._write_summary()
            finally:
                bar.close()
                restore()
                acc.end_training()
        finally:
            self.release_run_dir()
        if self._signal == signal.SIGINT:  # Ctrl-C: saved above, now interrupted as the user asked
            raise KeyboardInterrupt(f"stopped after step {self.step}")
        return self.run_dir

    def _loop(self, fixed: tuple[torch.Tensor, Any, Any] | None, bar: Any) -> None:
        """Steps until ``train.max_steps`` or a signal. Any exception but ``TrainingStopped`` (and
        ``KeyboardInterrupt``: a second Ctrl-C asks to stop at once) first writes an emergency checkpoint."""
        start = self.batches.position
        try:
            while self.step < self.cfg.max_steps and not self._stop:
                start = self.batches.position
                with self.tracking.timed():
                    scalars = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
                self.tracking.after_step(self.step, scalars)  # scalars every train.log_every steps; alarms
                if fixed is not None and self.step % self.cfg.sample_every == 0:
                    fixed = self.write_samples(fixed)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_verified()
                if self.periodic is not None and self.periodic.due(self.step):
                    self.evaluate()
        except TrainingStopped:
            raise
        except Exception as err:
            self._rescue(err, start)
            raise

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the current phase over ``gradient_accumulation_steps`` micro-batches."""
        acc, phase = self.acc, self.objective.phase(self.step)
        if phase not in self.optimizers:
            raise ValueError(f"objective.phase({self.step}) returned {phase!r}; its groups are {sorted(self.groups)}.")
        optimizer, losses, metrics = self.optimizers[phase], [], {}
        self._in_step = True
        for micro in range(self.cfg.gradient_accumulation_steps):
            if self.cfg.seed_per_microbatch:
                seed_microbatch(self.cfg.seed, self.step, micro * acc.num_processes + acc.process_index)
            batch = next(self.batches)
            with acc.accumulate(*self.modules.values()), acc.autocast():
                out = self.objective.loss(batch, self.step, phase)
                acc.backward(out.loss)
            losses.append(out.loss.detach().float())
            metrics = out.metrics
        loss = torch.stack(losses).mean()
        grad_norm = self._sync_and_clip(phase)
        # One collective per step: [loss non-finite, stop requested, loss] summed over ranks.
        flags = torch.tensor(
            [float(not torch.isfinite(loss)), float(self._stop_requested), float(loss)], device=acc.device
        )
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        # fp16: the grad scaler skips overflowing steps itself (a normal event), only a non-finite loss counts.
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None
        skip = bool(flags[0] > 0) or bad_grad
        self._stop = bool(flags[1] > 0)
        if skip:
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(flags[2]) / acc.num_processes
            problem = f"non-finite loss or gradient (loss={loss_value}, grad norm={grad_norm}); the update was skipped"
        else:
            problem = self._update(phase)
        self.bad_streak = self.bad_streak + 1 if problem else 0
        if problem:
            self.nonfinite_steps += 1
            self._check_bad_step(problem)
        self.step += 1
        self._in_step = False
        scalars = {
            "loss": float(flags[2]) / acc.num_processes,
            "nonfinite_steps": float(self.nonfinite_steps),
            "data/skipped": float(self.batches.skipped),  # unusable samples the stream passed over (webdataset)
            **learning_rates(self.optimizers),
        }
        if len(self.optimizers) > 1:  # alternating phases: each phase's own loss curve
            scalars[f"loss/{phase}"] = scalars["loss"]
        if grad_norm is not None:
            scalars[f"grad_norm/{phase}"] = grad_norm
        return {**scalars, **flatten_metrics("metrics", metrics)}

    def _sync_and_clip(self, phase: str) -> float | None:
        """Average the gradients DDP did not (``bypasses_prepared``, auxiliary modules; ``fewstep.train.sync``), then
        clip the phase's parameters and its auxiliary module's together. Returns the norm (None: DeepSpeed clips)."""
        acc, auxiliary = self.acc, self.auxiliary.get(phase)
        if acc.num_processes > 1 and self.objective.bypasses_prepared and self.layout is None:
            average_gradients(self.groups[phase], acc)  # DDP's hooks never ran (FSDP's run in any forward)
        if acc.num_processes > 1 and auxiliary is not None:
            average_gradients(auxiliary, acc)
        max_norm = self.recipe.optim.grad_clip if self.recipe.optim.grad_clip is not None else math.inf
        if self.layout is not None:
            return clip_grad_norm(self._clip_params[phase], max_norm)
        grad_norm = acc.clip_grad_norm_(self._clip_params[phase], max_norm)
        return float(grad_norm) if grad_norm is not None else None

    def _auxiliary_modules(self) -> dict[str, nn.Module]:
        """``objective.auxiliary()``, checked against the groups and moved to the device."""
        auxiliary = self.objective.auxiliary()
        unknown = sorted(set(auxiliary) - set(self.groups))
        if unknown:
            raise ValueError(
                f"{type(self.objective).__name__}.auxiliary() keys {unknown} are not trainable groups "
                f"({sorted(self.groups)}): key each auxiliary module by the group whose optimizer trains it."
            )
        return {name: module.to(self.acc.device) for name, module in auxiliary.items()}

    def _update(self, phase: str) -> str | None:
        """The phase's optimizer step, then the check of the weights it changed; a bad update is undone (the weights
        copied before it come back) and the schedule, EMA and ``on_step_end`` are skipped. Returns what was wrong, or
        None."""
        optimizer, rollback = self.optimizers[phase], self._rollbacks.get(phase)
        self._updating = True
        if rollback is not None:
            rollback.take()
        optimizer.step()
        largest, limit = self._checks[phase].max_abs(), self.cfg.max_weight_abs
        problem = self._agreed(None if largest <= limit else f"{phase}: max |w| = {largest:.4g}")  # NaN fails too
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            what = f"the update left non-finite or exploded weights ({problem}; train.max_weight_abs="
            what += f"{self.cfg.max_weight_abs:g})"
            if rollback is None:
                raise TrainingStopped(
                    f"Step {self.step + 1}: {what}, and train.rollback=false cannot undo it. Stopping without saving; "
                    f"the newest checkpoint is {latest_checkpoint(self.run_dir) or 'none'}. {_ADVICE}"
                )
            rollback.restore()
            self._updating = False
            return f"{what}; the update was undone"
        self.schedulers[phase].step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:  # averages of checked weights: finite and within the limit too
            self.ema.update(phase)
        if self.auxiliary_ema is not None and phase in self.auxiliary:
            self.auxiliary_ema.update(phase)
        self.objective.on_step_end(self.step, phase)
        self._updating = False
        return None

    def _check_bad_step(self, problem: str) -> None:
        """Report a bad step; stop past ``train.max_nonfinite`` of them in a row."""
        msg = (
            f"Step {self.step + 1}: {problem} ({self.bad_streak} bad in a row, {self.nonfinite_steps} in all, "
            f"train.max_nonfinite={self.cfg.max_nonfinite})."
        )
        if self.bad_streak > self.cfg.max_nonfinite:
            raise TrainingStopped(
                f"{msg} Stopping: too many bad steps in a row. Nothing bad was saved; the newest checkpoint is "
                f"{latest_checkpoint(self.run_dir) or 'none'}. {_ADVICE}"
            )
        if self.acc.is_main_process:
            _say(msg)

    def _weights_problem(
        self, named: dict[str, list[torch.Tensor]], finite: dict[str, list[torch.Tensor]] | None = None
    ) -> str | None:
        """``weights_problem`` of ``named`` against ``train.max_weight_abs`` and of ``finite`` (any finite value),
        agreed by every rank."""
        problems = [weights_problem(named, self.cfg.max_weight_abs), weights_problem(finite or {}, math.inf)]
        return self._agreed("; ".join(p for p in problems if p) or None)

    def _agreed(self, problem: str | None) -> str | None:
        """``problem`` of this rank, or a note when another rank found one (collective)."""
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(torch.tensor([float(problem is not None)], device=self.acc.device), "sum")
            if problem is None and bool(flag[0] > 0):
                problem = "another rank's weights are non-finite or exploded"
        return problem

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_verified(self) -> Path | None:
        """``save()`` (collective) once every weight it writes is checked: trainable weights, auxiliary modules and
        EMA shadows finite and within ``train.max_weight_abs``, buffers finite. Bad ones are refused with
        ``TrainingStopped``; nothing is written. A no-op when this step is saved already, and while the last steps
        were bad (``bad_streak``): then the newest checkpoint stays the one written before the trouble began."""
        if self._last_saved == self.step:
            return None
        if self.bad_streak:  # the weights are an earlier step's: the newest checkpoint stays the last good one
            if self.acc.is_main_process:
                _say(f"Step {self.step} is not saved: its last {self.bad_streak} step(s) were bad.")
            return None
        problem = self._weights_problem(*self._saved_tensors())
        if problem is not None:
            raise TrainingStopped(
                f"Refusing to save step {self.step}: the weights are non-finite or exploded ({problem}; "
                f"train.max_weight_abs={self.cfg.max_weight_abs:g}). Nothing was written; the newest checkpoint is "
                f"{latest_checkpoint(self.run_dir) or 'none'}. {_ADVICE}"
            )
        self._saving = True
        try:
            return self.save()
        finally:
            self._saving = False

    def _saved_tensors(self) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """What a checkpoint writes, by name: weights and EMA shadows (checked against the limit), and the buffers of
        full models (only checked to be finite: they are not trained)."""
        weights: dict[str, list[torch.Tensor]] = {}
        buffers: dict[str, list[torch.Tensor]] = {}
        modules = {name: self.acc.unwrap_model(m) for name, m in self.modules.items()}
        modules.update({f"auxiliary/{name}": m for name, m in self.auxiliary.items()})
        for name, module in modules.items():
            params = trainable_parameters(module)
            weights[name] = [local(p) for p in params.values()]  # this rank's shard (every rank checks its own)
            buffers[f"{name} buffers"] = [local(t) for key, t in trainable_state(module).items() if key not in params]
        for prefix, ema in (("ema", self.ema), ("auxiliary ema", self.auxiliary_ema)):
            for group, shadow in ema.shadow.items() if ema is not None else ():
                weights[f"{prefix}/{group}"] = [local(t) for t in shadow.values()]
        return weights, buffers

    def save(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXXX`` (collective) unless this step is saved already."""
        if self._last_saved == self.step:
            return None
        path = checkpoint_dir(self.run_dir, self.step)
        meta = {
            "step": self.step,
            "data_position": self.batches.position,
            "data_state": self.batches.stream_state(),  # where the stream was (information; data_position resumes)
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self.acc.num_processes,
            "grad_scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
        }
        save_checkpoint(
            path,
            self.acc,
            self.modules,
            self.optimizers,
            self.schedulers,
            self.ema,
            self.objective.state_dict(),
            meta,
            keep_last=self.cfg.keep_last,
            auxiliary=self.auxiliary,
            auxiliary_ema=self.auxiliary_ema,
            fingerprint=self._fingerprint(),
            sharded=self.layout is not None,
        )
        self._last_saved = self.step
        return path

    def _load(self, ckpt: Path) -> int:
        # verified first; train.resume=auto passes over a corrupt newest checkpoint to the newest intact one
        fallback = self.cfg.resume == "auto"
        ckpt = self.resumed_from = intact_checkpoint(ckpt, self._fingerprint(), fallback=fallback, accelerator=self.acc)
        state = (self.modules, self.optimizers, self.schedulers, self.ema, self.auxiliary, self.auxiliary_ema)
        objective_state, meta = load_checkpoint(ckpt, self.acc, *state, verified=True)
        self.objective.load_state_dict(objective_state)
        if meta.get("grad_scaler") and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(meta["grad_scaler"])
        self.step, self.nonfinite_steps = int(meta["step"]), int(meta["nonfinite_steps"])
        if self.acc.is_main_process:
            _say(f"Resuming from {ckpt} (step {self.step}).")
        return int(meta["data_position"])

    def _fingerprint(self) -> dict[str, Any]:
        """What this run's checkpoints hold (their manifest's fingerprint): trainable shapes, family, objective,
        teacher."""
        return checkpoint_fingerprint(self.groups, self.recipe, self.teacher)

    def _apply_recipe_hyperparameters(self) -> None:
        """After ``_load``: the recipe's ``optim`` settings (LR and the schedule's base LR, weight decay, betas, eps)
        replace the checkpoint's, so the run uses what ``resolved_config.yaml`` records."""
        changes = apply_hyperparameters(self.optimizers, self.schedulers, self.recipe.optim)
        if changes and self.acc.is_main_process:
            _say(f"The recipe's optimizer settings replace the checkpoint's: {', '.join(changes)}.")

    def _rescue(self, err: Exception, start_position: int) -> None:
        """After ``err`` in the loop: write a checkpoint of the last complete step, unless it is saved already, the
        failure came during an update or a save, several processes run (a save needs all of them), or the weights
        are bad. Says where, or why not. A step cut short is done again after a resume (its data position is
        restored)."""
        why_not = None
        if self._last_saved == self.step:
            why_not = f"the newest checkpoint already holds step {self.step}"
        elif self.acc.num_processes > 1:
            why_not = "a checkpoint needs every process, and the others may not be able to join"
        elif self._saving:
            why_not = "the failure came while writing a checkpoint"
        elif self._updating:
            why_not = "the failure came in the middle of a weight update"
        elif self.bad_streak:
            why_not = f"the last {self.bad_streak} step(s) were bad"
        failure = f"{type(err).__name__} during step {self.step + 1}"
        if why_not is None:
            if self._in_step:
                self.batches.position = start_position  # the cut-short step's batches come again on resume
            try:
                path = self.save_verified()
            except Exception as save_err:  # e.g. bad weights, a full disk: the original error matters more
                why_not = f"{type(save_err).__name__}: {save_err}"
            else:
                if self.acc.is_main_process:
                    _say(f"{failure}: wrote an emergency checkpoint of step {self.step} to {path}.")
                return
        if self.acc.is_main_process:
            _say(f"{failure}: no emergency checkpoint ({why_not}).")

    def release_run_dir(self) -> None:
        """Unlock the output directory (``fit`` does it when it ends)."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()
            self._run_lock = None

    # --- periodic evaluation ------------------------------------------------------------------------------------

    def _build_evaluator(self, factory: EvaluatorFactory | None, components: Components) -> PeriodicEvaluator | None:
        """``eval.every_steps``: the evaluation of the student (a factory fails here, at startup, if no metric fits)."""
        every = self.recipe.eval.every_steps
        if not every:
            return None
        if self.layout is not None:
            raise ValueError(
                f"eval.every_steps={every} evaluates on the main process alone, but sharded (FSDP) weights need every "
                "process in each forward. Unset eval.every_steps and evaluate the checkpoints afterwards with "
                "`fewstep eval RUN_DIR --checkpoint step_XXXXXXXX` (it reads sharded checkpoints whole)."
            )
        if factory is None:
            if self.acc.is_main_process:
                logger.warning(NO_EVALUATOR.format(every=every))
            return None
        weights = "ema" if self.ema is not None else "raw"
        return factory(self.recipe, components, self.run_dir, weights, self.resumed_from is not None)

    def evaluate(self) -> None:
        """Evaluate the student (EMA weights if any) on the main process, log ``eval/<metric>@<steps>``, and keep the
        checkpoint of this step as ``checkpoints/best`` when it is the best so far (collective). A failure turns
        periodic evaluation off instead of ending the run."""
        acc, improved, failed = self.acc, False, False
        if acc.is_main_process:
            try:
                with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                    scalars, improved = self.periodic.run(self.step)
                acc.log(scalars, step=self.step)
            except Exception as err:  # an evaluation must never cost the run
                _say(f"WARNING: evaluation at step {self.step} failed ({type(err).__name__}: {err}); it is off now.")
                failed = True
        flags = torch.tensor([float(improved), float(failed)], device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        if flags[0] > 0:
            self.save_verified()  # collective; a no-op when this step is saved already
            if acc.is_main_process and self._last_saved == self.step:  # not saved after a bad step
                self.periodic.keep_best(checkpoint_dir(self.run_dir, self.step))
            acc.wait_for_everyone()
        if flags[1] > 0:
            self.periodic = None

    # --- samples, summary, signals -------------------------------------------------------------------------------

    def _fixed_sample_inputs(self) -> tuple[torch.Tensor, Any, list[str] | None] | None:
        """The noise, conditioning and column labels every sample grid of this run uses (drawn from ``train.seed``)."""
        n = self.cfg.num_sample_images
        every_rank = self.layout is not None  # sharded forwards are collective: every rank samples, main writes
        if not self.cfg.sample_every or n <= 0 or not (self.acc.is_main_process or every_rank):
            return None
        preview = self.batches.preview(n)
        if preview.x0 is not None:
            shape = tuple(preview.x0.shape[1:])
        else:  # data-free: the teacher's latent shape at data.resolution
            from fewstep.models.backbones import latent_shape

            shape = latent_shape(self.teacher, n, self.recipe.data.resolution)[1:]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randn((n, *shape), generator=gen).to(self.acc.device), preview.cond, preview.extra.get("labels")

    def write_samples(self, fixed: tuple[torch.Tensor, Any, Any]) -> tuple[torch.Tensor, Any, Any] | None:
        """``samples/step_XXXXXXXX.png`` (EMA weights if any). A failure turns grids off instead of ending the run;
        returns the inputs for the next grid, or None."""
        noise, cond, labels = fixed
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        try:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                rows = write_samples(
                    self.objective,
                    self.teacher,
                    noise,
                    cond,
                    list(self.cfg.sample_steps),
                    path,
                    0,
                    labels,
                    save=self.acc.is_main_process,
                )
            self.tracking.samples(self.step, path, rows)  # to the trackers; sample alarms
        except Exception as err:  # a sample grid must never cost the run
            _say(f"WARNING: sample grid at step {self.step} failed ({type(err).__name__}: {err}); grids are off now.")
            return None
        return fixed

    def _write_summary(self) -> None:
        """``run_summary.json``: final step, world size, and a fingerprint of every rank's trainable weights (they
        must agree: a mismatch means the ranks diverged)."""
        from accelerate.utils import gather_object

        digest = hashlib.sha256()
        states = {name: trainable_state(self.acc.unwrap_model(module)) for name, module in self.modules.items()}
        states.update({f"auxiliary/{name}": trainable_state(module) for name, module in self.auxiliary.items()})
        for name in sorted(states):
            for key, t in sorted(states[name].items()):
                digest.update(key.encode())
                digest.update(full(t).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        fingerprints = gather_object([digest.hexdigest()])
        state_bytes = gather_object([self._state_bytes()])
        if self.acc.is_main_process:
            summary = {
                "step": self.step,
                "world_size": self.acc.num_processes,
                "nonfinite_steps": self.nonfinite_steps,
                "stopped_by_signal": self._stop,
                "resumed_from": str(self.resumed_from) if self.resumed_from is not None else None,
                "weight_fingerprints": fingerprints,
                "state_bytes_per_rank": state_bytes,
            }
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
            if len(set(fingerprints)) > 1:
                _say(f"WARNING: the ranks ended with different weights: {fingerprints}")

    def _state_bytes(self) -> dict[str, int]:
        """This rank's resident training state in bytes (its shards when sharded): the frozen and the trainable
        weights of every role, AdamW's state and the EMA shadows. What ``fewstep plan`` predicts as static memory."""
        modules = [self.teacher.denoiser.backbone, *self.modules.values(), *self.auxiliary.values()]
        seen: dict[int, Tensor] = {}
        for module in modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        trainable = sum(local(p).nbytes for p in seen.values() if p.requires_grad)
        frozen = sum(local(p).nbytes for p in seen.values() if not p.requires_grad)
        optimizer = sum(
            local(v).nbytes
            for o in self.optimizers.values()
            for state in o.state.values()
            for v in state.values()
            if isinstance(v, Tensor)
        )
        shadows = [t for ema in (self.ema, self.auxiliary_ema) if ema is not None for d in ema.shadow.values()
                   for t in d.values()]  # fmt: skip
        ema = sum(local(t).nbytes for t in shadows)
        return {"frozen_weights": frozen, "trainable_weights": trainable, "optimizer": optimizer, "ema": ema}

    def _install_signal_handlers(self) -> Any:
        """SIGTERM/SIGINT ask for a clean stop (checkpoint after this step); a second signal acts as usual."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:  # only sets flags: printing here could re-enter stdio
            self._stop_requested, self._signal = True, signum
            signal.signal(signum, previous[signum])

        for sig in previous:
            signal.signal(sig, handler)
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def seed_microbatch(seed: int, step: int, index: int) -> None:
    """Seed Python's, numpy's and torch's RNGs for global micro-batch ``index`` of ``step``
    (``train.seed_per_microbatch``: the noise of a micro-batch then depends on where it is in the global batch, not on
    which process draws it)."""
    import random

    import numpy as np

    value = ((seed * 1_000_003 + step) * 65_537 + index) % (2**63)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


def _say(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


def write_resolved_config(recipe: Recipe, path: Path) -> None:
    """The recipe with every default filled in; ``fewstep train resolved_config.yaml`` repeats the run."""
    from fewstep.config.load import dump_recipe

    path.write_text(dump_recipe(recipe))
