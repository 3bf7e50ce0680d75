"""The student's sampling schedule as a stock diffusers scheduler config plus ``fewstep_student.json``.

An objective that can be exported describes how its student is sampled with ``sampling_spec() -> SamplingSpec``:
the diffusers scheduler class and config, the exact timesteps or sigmas per step count (as trained), and the
recommended steps and guidance with their convention. This module builds scheduler configs from a teacher and
writes / reads the spec.

``fewstep_student.json`` is read through a schema (``read_student_file``): a file that is not JSON, lacks a key or
holds a value of another type is refused with one ``ValueError`` naming the file and the key. Only the diffusers
scheduler classes in ``SCHEDULER_CLASSES`` are ever instantiated from it, and only the pipeline arguments in
``CALL_KWARGS`` are passed on.
"""

from __future__ import annotations

import inspect
import json
import math
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher
from fewstep.solvers.grids import linspace_grid, trailing_vp_grid

SPEC_FILE = "fewstep_student.json"
SchedulerClass = Literal["DDIMScheduler", "FlowMatchEulerDiscreteScheduler", "LCMScheduler", "TCDScheduler"]
SCHEDULER_CLASSES: tuple[str, ...] = get_args(SchedulerClass)  # the diffusers schedulers fewstep exports
CallKwarg = Literal["eta"]  # TCDScheduler's γ
CALL_KWARGS: tuple[str, ...] = get_args(CallKwarg)
StepKey = Literal["timesteps", "sigmas", "levels"]  # per step count: the trained schedule


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("should be a finite number")
    return value


Number = Annotated[StrictInt | StrictFloat, AfterValidator(_finite)]


class StudentFile(BaseModel):
    """The schema of ``fewstep_student.json`` (what ``SamplingSpec.to_json`` writes, plus the export's ``source``)."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field(min_length=1)
    scheduler_class: SchedulerClass
    scheduler_config: dict[str, Any]
    recommended_steps: StrictInt = Field(ge=1)
    guidance_scale: Number = Field(ge=0)
    guidance_convention: str
    steps: dict[Annotated[int, Field(ge=1)], dict[StepKey, list[Number]]] = Field(min_length=1)
    notes: list[str] = Field(default_factory=list)
    extra_call_kwargs: dict[CallKwarg, Number] = Field(default_factory=dict)
    source: dict[str, str] | None = None


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class ``name``, one of ``SCHEDULER_CLASSES`` (no other name is looked up)."""
    if name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"scheduler class {name!r} is not one fewstep exports; allowed: {', '.join(SCHEDULER_CLASSES)}."
        )
    import diffusers

    return getattr(diffusers, name)


def check_student_file(data: Any, source: str = SPEC_FILE) -> dict[str, Any]:
    """``data`` (parsed ``fewstep_student.json``) checked against ``StudentFile``: the same mapping with step counts
    as ints.

    Raises:
        ValueError: naming ``source``, each bad key, what it should be and the value found.
    """
    try:
        checked = StudentFile.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors(include_url=False)[:3]:
            key = ".".join(str(part) for part in error["loc"]) or "(the whole file)"
            got = f"; got {reprlib.repr(error['input'])}" if error["type"] != "missing" else ""
            problems.append(f"{key}: {error['msg'].removeprefix('Value error, ')}{got}")
        more = f" (and {err.error_count() - 3} more)" if err.error_count() > 3 else ""
        raise ValueError(
            f"{source} is not a valid fewstep student file: {'; '.join(problems)}{more}. It was not written by "
            "`fewstep export` or was edited: export the run again."
        ) from None
    return checked.model_dump(exclude_unset=True)


@dataclass
class SamplingSpec:
    """How to sample an exported student with a stock diffusers scheduler.

    Attributes:
        objective: the objective that trained the student (``lcm``, ...).
        scheduler_class: a diffusers scheduler class name (``LCMScheduler``, ``FlowMatchEulerDiscreteScheduler``).
        scheduler_config: its full config (written to ``scheduler/scheduler_config.json``).
        recommended_steps: the step count to advertise.
        guidance_scale: the ``guidance_scale`` to pass to the pipeline (convention in ``guidance_convention``).
        guidance_convention: how ``guidance_scale`` is read, and how guidance was used in training.
        steps: per step count, the pipeline arguments that reproduce training exactly: ``{"timesteps": [...]}``
            (integers, informative: ``num_inference_steps`` alone gives them) or ``{"sigmas": [...]}`` (to pass),
            plus informative extras such as ``"levels"`` (the noise levels after the scheduler's shift).
        notes: free-text caveats shown on the model card.
        extra_call_kwargs: further pipeline arguments for every step count (``{"eta": γ}`` for TCDScheduler).
    """

    objective: str
    scheduler_class: str
    scheduler_config: dict[str, Any]
    recommended_steps: int
    guidance_scale: float
    guidance_convention: str
    steps: dict[int, dict[str, list[float]]]
    notes: list[str] = field(default_factory=list)
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"eta": γ} for TCDScheduler

    def call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Keyword arguments for ``pipe(prompt, **kwargs)`` that reproduce the trained ``num_steps`` schedule."""
        entry = self.steps.get(num_steps)
        if entry is None:
            raise ValueError(f"No exported schedule for {num_steps} steps; exported: {sorted(self.steps)}.")
        kwargs: dict[str, Any] = {"guidance_scale": self.guidance_scale}
        if "sigmas" in entry:
            kwargs["sigmas"] = list(entry["sigmas"])
        else:
            kwargs["num_inference_steps"] = num_steps
        kwargs.update(self.extra_call_kwargs)
        return kwargs

    def scheduler(self) -> Any:
        """A fresh diffusers scheduler instance built from ``scheduler_config``."""
        return scheduler_class(self.scheduler_class).from_config(self.scheduler_config)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = {str(k): v for k, v in self.steps.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = SPEC_FILE) -> SamplingSpec:
        """A spec from ``to_json``'s mapping, checked (``check_student_file``; ``source`` names it in errors)."""
        data = check_student_file(data, source)
        data.pop("source", None)  # the export's provenance (run, checkpoint, weights): fewstep.export.read_source
        return cls(**data)


def write_schedule(spec: SamplingSpec, out_dir: str | Path) -> Path:
    """Write ``scheduler/scheduler_config.json`` (loadable with ``<Scheduler>.from_pretrained(out_dir, subfolder=
    "scheduler")``) and ``fewstep_student.json``. Returns the spec file."""
    out_dir = Path(out_dir)
    spec.scheduler().save_pretrained(out_dir / "scheduler")
    path = out_dir / SPEC_FILE
    path.write_text(json.dumps(spec.to_json(), indent=2, ensure_ascii=False) + "\n")
    return path


def read_student_file(out_dir: str | Path) -> dict[str, Any]:
    """The checked contents of ``<out_dir>/fewstep_student.json`` (``check_student_file``).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: it is not JSON, or does not match the schema (the message names the file and the key).
    """
    path = Path(out_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {SPEC_FILE} in {out_dir}: export the student with fewstep.export first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}): the export is corrupt; export the run "
            "again."
        ) from None
    return check_student_file(data, str(path))


def read_schedule(out_dir: str | Path) -> SamplingSpec:
    """Read the ``fewstep_student.json`` written by ``write_schedule`` (checked: ``read_student_file``)."""
    data = read_student_file(out_dir)
    data.pop("source", None)
    return SamplingSpec(**data)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler configs from a teacher
# ---------------------------------------------------------------------------------------------------------------------


def teacher_scheduler_config(teacher: Teacher) -> dict[str, Any]:
    """The teacher's diffusers scheduler config; synthesised from its schedule for a custom (pipeline-less) teacher.

    A scheduler whose ``ᾱ`` no stock scheduler computes from its betas (CogVideoX's SNR shift, ``snr_shift_scale``) is
    given as the ``trained_betas`` of its ``ᾱ`` instead (``vp_trained_betas``), so the schedulers an export builds
    from it (``LCMScheduler``) run on the teacher's levels."""
    scheduler = getattr(teacher.pipeline, "scheduler", None)
    if scheduler is not None and "snr_shift_scale" not in scheduler.config:
        return dict(scheduler.config)
    schedule = teacher.schedule
    if schedule.kind == "vp":
        base = {} if scheduler is None else dict(scheduler.config)
        for key in ("snr_shift_scale", "rescale_betas_zero_snr", "beta_schedule", "beta_start", "beta_end"):
            base.pop(key, None)  # all in trained_betas
        return {
            **base,
            "num_train_timesteps": schedule.num_train_timesteps,
            "trained_betas": vp_trained_betas(schedule),
            "prediction_type": teacher.denoiser.prediction_type,
            "set_alpha_to_one": schedule.final_alpha_cumprod == 1.0,
        }
    if schedule.kind == "flow":
        return {
            "num_train_timesteps": 1000,
            "shift": schedule.shift_factor,
            "use_dynamic_shifting": schedule.use_dynamic_shifting,
            "base_shift": schedule.base_shift,
            "max_shift": schedule.max_shift,
            "base_image_seq_len": schedule.base_image_seq_len,
            "max_image_seq_len": schedule.max_image_seq_len,
        }
    raise ValueError(f"No diffusers scheduler describes a {schedule.kind!r} schedule; export supports vp and flow.")


def vp_trained_betas(schedule: Any) -> list[float]:
    """The betas whose cumulative product is the schedule's ``ᾱ``: ``β_n = 1 − ᾱ_n / ᾱ_{n−1}`` (1 at a zero-SNR end)."""
    acp = schedule.alphas_cumprod.double()
    return (1 - acp / torch.cat([acp.new_ones(1), acp[:-1]])).tolist()


def scheduler_from_teacher(cls: Any, teacher: Teacher, **overrides: Any) -> Any:
    """A diffusers scheduler ``cls`` built from the teacher's scheduler config, keeping only the keys ``cls`` takes
    (no warnings about e.g. Euler's ``use_karras_sigmas`` reaching an ``LCMScheduler``), then ``overrides``."""
    accepted = inspect.signature(cls.__init__).parameters
    base = {k: v for k, v in teacher_scheduler_config(teacher).items() if k in accepted}
    return cls.from_config({**base, **overrides})


def lcm_scheduler_config(teacher: Teacher, original_inference_steps: int, timestep_scaling: float) -> dict[str, Any]:
    """An ``LCMScheduler`` config on the teacher's VP betas with the trained skipping grid.

    Clipping and thresholding are switched off (the student was trained and is sampled without them); the
    prediction type is the teacher's (the student shares its parameterisation).
    """
    from diffusers import LCMScheduler

    scheduler = scheduler_from_teacher(
        LCMScheduler,
        teacher,
        original_inference_steps=original_inference_steps,
        timestep_scaling=timestep_scaling,
        prediction_type=teacher.denoiser.prediction_type,
        clip_sample=False,
        thresholding=False,
    )
    return dict(scheduler.config)


def flow_scheduler_config(teacher: Teacher, stochastic_sampling: bool, unshifted: bool = False) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config on the teacher's shift; ``stochastic_sampling=True`` makes its step
    the consistency re-noise step ``x' = (1 − s')·x̂0 + s'·z`` (deterministic Euler otherwise). ``unshifted``: no shift
    at all (static shift 1, dynamic shifting off), so ``sigmas=`` are used as given at every resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    # no terminal stretch (Qwen-Image's shift_terminal 0.02): students are trained and sampled on FlowSchedule.shift
    # levels, which end at 0, so the exported scheduler must not move them
    config = teacher_scheduler_config(teacher)
    overrides: dict[str, Any] = {"shift_terminal": None} if config.get("shift_terminal") else {}
    if config.get("use_flow_sigmas"):  # a multistep scheduler on flow sigmas (Sana's DPM-Solver): its `flow_shift`
        overrides["shift"] = teacher.schedule.shift_factor  # is the shift (FlowMatchEuler's `shift` key is absent)
    if unshifted:
        overrides.update(shift=1.0, use_dynamic_shifting=False)
    scheduler = scheduler_from_teacher(
        FlowMatchEulerDiscreteScheduler, teacher, stochastic_sampling=stochastic_sampling, **overrides
    )
    return dict(scheduler.config)


# ---------------------------------------------------------------------------------------------------------------------
# Specs for re-noising (consistency-style) samplers
# ---------------------------------------------------------------------------------------------------------------------


def lcm_vp_spec(
    teacher: Teacher,
    timesteps: dict[int, list[int]],
    original_inference_steps: int,
    timestep_scaling: float,
    **common: Any,
) -> SamplingSpec:
    """A VP student sampled by ``LCMScheduler``: ``timesteps[num_steps]`` are what ``set_timesteps(num_steps)`` picks
    from the ``original_inference_steps`` skipping grid (informative; ``num_inference_steps`` reproduces them).
    ``common``: ``objective``, ``recommended_steps``, ``guidance_scale``, ``guidance_convention``."""
    notes = [
        "Sample with LCMScheduler: timesteps are picked from the trained skipping grid "
        f"(original_inference_steps={original_inference_steps}); the re-noise between steps uses the pipeline's "
        "generator."
    ]
    return SamplingSpec(
        scheduler_class="LCMScheduler",
        scheduler_config=lcm_scheduler_config(teacher, original_inference_steps, timestep_scaling),
        steps={n: {"timesteps": list(t)} for n, t in timesteps.items()},
        notes=notes,
        **common,
    )


def flow_renoise_spec(
    teacher: Teacher,
    sigmas: dict[int, list[float]],
    levels: dict[int, list[float]],
    max_c_skip: float,
    unshifted: bool = False,
    **common: Any,
) -> SamplingSpec:
    """A flow student sampled by ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` (predict x̂0, re-noise
    to the next level). ``sigmas[num_steps]`` go to the pipeline; the scheduler's static shift maps them to
    ``levels[num_steps]``, the levels the student was trained and is sampled at. ``max_c_skip``: the largest LCM
    boundary weight on ``x`` at those levels, which this scheduler leaves out. ``unshifted``: the exported scheduler
    has no shift (``sigmas`` are the levels), for students whose levels do not depend on the resolution on a teacher
    that shifts by resolution (Flux, Qwen-Image)."""
    shift = (
        "the exported scheduler applies no shift, so they are the levels themselves, at every resolution"
        if unshifted
        else "before the scheduler's own shift, which maps them to `levels`"
    )
    notes = [
        f"Sample with FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) and pass `sigmas=` ({shift}). That "
        "scheduler omits the consistency boundary blend; "
        f"at the exported levels c_skip <= {max_c_skip:.1e}, so the difference is negligible.",
        "Pipelines that do not pass `generator` to scheduler.step (e.g. StableDiffusion3Pipeline) draw the re-noise "
        "from the global RNG: call torch.manual_seed(seed) before sampling.",
    ]
    return _flow_spec(teacher, sigmas, levels, True, notes, unshifted, **common)


def flow_euler_spec(
    teacher: Teacher, sigmas: dict[int, list[float]], levels: dict[int, list[float]], note: str = "", **common: Any
) -> SamplingSpec:
    """A flow student sampled by deterministic ``FlowMatchEulerDiscreteScheduler`` steps between ``levels`` (a PCM
    student at γ = 0: each Euler step is the DDIM jump to the next segment edge). ``sigmas[num_steps]`` go to the
    pipeline before the scheduler's own shift. ``note``: an extra line for the card."""
    notes = [
        "Sample with FlowMatchEulerDiscreteScheduler (deterministic) and pass `sigmas=` (before the scheduler's own "
        "shift, which maps them to `levels`): one Euler step per segment, from each edge to the next.",
        *([note] if note else []),
    ]
    return _flow_spec(teacher, sigmas, levels, False, notes, **common)


def _flow_spec(
    teacher: Teacher, sigmas: dict[int, list[float]], levels: dict[int, list[float]], stochastic: bool,
    notes: list[str], unshifted: bool = False, **common: Any,
) -> SamplingSpec:  # fmt: skip
    return SamplingSpec(
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_config=flow_scheduler_config(teacher, stochastic_sampling=stochastic, unshifted=unshifted),
        steps={n: {"sigmas": list(sigmas[n]), "levels": list(levels[n])} for n in sigmas},
        notes=notes,
        **common,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Specs for deterministic samplers
# ---------------------------------------------------------------------------------------------------------------------


def deterministic_spec(
    teacher: Teacher, objective: str, steps: tuple[int, ...], sampler: str, recommended: int,
    guidance_scale: float = 1.0, guidance_convention: str | None = None, notes: list[str] | None = None,
) -> SamplingSpec:  # fmt: skip
    """A ``SamplingSpec`` for a deterministic student: DDIM (trailing) for VP, FlowMatchEuler with explicit sigmas for
    flow. At 1 step it is exactly a reflow student's sampler; above, the noise-reusing sampler is fewstep's.

    Args:
        teacher: the teacher whose scheduler config the student keeps.
        objective: the objective name written to the spec.
        steps: the step counts to list.
        sampler: ``noise_reuse`` (rfpp's sampler, noted on the card) or ``euler``.
        recommended: the step count to advertise.
        guidance_scale, guidance_convention: what to pass to the pipeline and how to read it.
        notes: card notes; default: guidance is baked into the reflow pairs.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if notes is None:
        notes = ["Guidance was baked into the reflow pairs: sample with guidance_scale=1 (one forward per step)."]
    if sampler == "noise_reuse":
        notes.append(
            "Trained for rfpp's noise-reusing sampler (x' = α·x̂0 + σ·z with the initial noise z): above one step, "
            "diffusers' deterministic scheduler is the Euler ODE step instead; objective.sampler() reproduces it."
        )
    schedule = teacher.schedule
    common = dict(
        objective=objective, recommended_steps=recommended, guidance_scale=guidance_scale, notes=notes,
        guidance_convention=guidance_convention or f"{GUIDANCE_CONVENTION}; the teacher's CFG is baked into the pairs",
    )  # fmt: skip
    if schedule.kind == "vp":
        config = scheduler_from_teacher(DDIMScheduler, teacher, timestep_spacing="trailing", clip_sample=False,
                                        prediction_type=teacher.denoiser.prediction_type)  # fmt: skip
        table = {n: {"timesteps": schedule.model_timestep(trailing_vp_grid(n, schedule.num_train_timesteps)[:-1])
                     .long().tolist()} for n in steps}  # fmt: skip
        return SamplingSpec(
            scheduler_class="DDIMScheduler", scheduler_config=dict(config.config), steps=table, **common
        )
    if schedule.kind != "flow":
        raise ValueError(f"Export supports vp and flow teachers; this one has a {schedule.kind!r} schedule.")
    config = scheduler_from_teacher(FlowMatchEulerDiscreteScheduler, teacher, stochastic_sampling=False)
    table = {}
    for n in steps:
        sigmas = linspace_grid(n)[:-1]
        table[n] = {"sigmas": sigmas.tolist(), "levels": schedule.shift(sigmas).tolist()}
    return SamplingSpec(
        scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=dict(config.config), steps=table, **common
    )
