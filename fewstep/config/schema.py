"""The recipe schema: typed blocks, every key read, unknown keys rejected (``extra="forbid"``).

The ``objective`` block is looked up in ``fewstep.objectives.OBJECTIVES`` by its ``name`` and validated into that
objective's own ``Config``, so ``recipe.objective`` is the objective's typed config.

Use ``fewstep.config.validate_recipe`` / ``load_recipe`` to get every error at once as a ``RecipeError``;
``Recipe.model_validate`` works too and raises pydantic's ``ValidationError``.

No number in a recipe may be infinite or NaN (``.inf``, ``-.inf``, ``.nan``, ``"inf"``): the blocks defined here refuse
them through pydantic's ``allow_inf_nan=False``, and every objective's ``Config`` is walked after validation
(``nonfinite_issues``), so each such value is reported with its key.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from fewstep.config.errors import MISSING, RecipeIssue, did_you_mean, issue, issues_from_validation, raise_issues

BLOCK = ConfigDict(extra="forbid", allow_inf_nan=False)  # every block: unknown keys and inf / nan refused
FINITE = "should be a finite number"  # pydantic's own words for allow_inf_nan=False

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class TeacherConfig(BaseModel):
    """What to distill. ``pretrained``: hub id, local dir, ``tiny:<family>`` or ``fewstep:<asset>``."""

    model_config = BLOCK

    pretrained: str = Field(min_length=1)
    family: Literal[
        "auto", "sd15", "sdxl", "sd3", "flux", "unet2d", "sd35", "qwen_image", "wan21", "wan21_i2v", "wan22",
        "wan22_ti2v", "ltx", "pixart_sigma", "sana", "wan_class", "cogvideox", "flux2", "chroma", "zimage",
        "hunyuan15", "hunyuan15_i2v",
    ] = "auto"  # fmt: skip
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    guidance_scale: float = Field(1.0, ge=0.0)  # Imagen convention: cfg = uncond + w·(cond − uncond), w = 1 is off
    guidance_scale_2: float | None = Field(None, ge=0.0)  # Wan 2.2: the low-noise expert's (None: guidance_scale)
    # Z-Image (ZImagePipeline's options): cap each guided output at this multiple of the conditional one's norm (0:
    # off; the pipeline's True is 1), and no guidance where its normalised time (1000 − t) / 1000 exceeds truncation
    cfg_normalization: float = Field(0.0, ge=0.0)
    cfg_truncation: float = Field(1.0, ge=0.0)
    revision: str | None = None
    variant: str | None = None


class LoraBlock(BaseModel):
    """LoRA adapter shape. ``alpha=None`` means ``alpha = rank`` (scale 1)."""

    model_config = BLOCK

    rank: PositiveInt = 64
    alpha: PositiveFloat | None = None
    target_modules: list[str] | None = Field(None, min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class StudentConfig(BaseModel):
    """``kind: lora`` (adapters on the frozen teacher base) or ``kind: full`` (a trainable copy)."""

    model_config = BLOCK

    kind: Literal["lora", "full"] = "lora"
    lora: LoraBlock | None = None  # filled with defaults for kind: lora; must stay unset for kind: full
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _lora_matches_kind(self) -> StudentConfig:
        if self.kind == "lora" and self.lora is None:
            self.lora = LoraBlock()
        elif self.kind == "full" and self.lora is not None:
            raise_issues(
                [
                    issue(
                        "lora",
                        "only applies to kind: lora",
                        self.lora.model_dump(),
                        hint=("Remove the lora block (override: student.lora=null) or set student.kind=lora."),
                    )
                ]
            )
        return self


class DataConfig(BaseModel):
    """Training data: the digits set, an image folder (images + metadata.jsonl), a prompt list / file, or clean
    samples in a safetensors file (``tensors``: ``x0`` and optional ``class_labels``, for custom teachers), or
    Fashion-MNIST (``fashion_mnist``: ``path`` is an optional directory of its idx files, see fewstep.data.fashion),
    or moving digits (``moving_digits``: clips of a digit bouncing in a frame, ``num_frames`` frames of
    ``resolution`` pixels, default 8 × 24 × 24; see fewstep.data.moving_digits),
    or reflow pairs (``pairs``: ``path`` is a directory written by ``fewstep pairs``), or WebDataset tar shards
    (``webdataset``: ``path`` is a brace pattern, a directory of .tar files, a .txt list of shards, or a list of
    these; see fewstep.data.webdataset), or a precomputed cache of text embeddings and VAE latents (``cache``:
    ``path`` is a directory written by ``fewstep cache``; ``resolution``, if set, must be the cache's; see
    fewstep.data.cache).

    ``buckets`` (image_folder, webdataset): a preset (``sdxl``, ``sd15``) or ``[height, width]`` shapes
    (``[frames, height, width]`` for video); each image trains at the bucket of nearest aspect ratio, each batch is
    one bucket (fewstep.data.buckets); it takes the place of ``resolution``. ``num_frames`` / ``frame_stride``
    (webdataset, image_folder: a folder of video files): video clips of that many frames, every ``frame_stride``-th;
    with ``prompts``, the frame count of data-free video batches; with ``cache``, if set, the cache's.
    ``shuffle_buffer`` (webdataset): the samples a shard is shuffled across."""

    model_config = BLOCK

    source: Literal[
        "cache", "digits", "fashion_mnist", "image_folder", "moving_digits", "pairs", "prompts", "tensors", "webdataset"
    ]
    path: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    prompts: list[str] | None = Field(None, min_length=1)
    resolution: PositiveInt | None = None
    buckets: str | list[list[PositiveInt]] | None = Field(None, min_length=1)
    batch_size: PositiveInt = 8
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    shuffle_buffer: PositiveInt = 1000
    caption_column: str = Field("text", min_length=1)
    num_frames: PositiveInt | None = None
    frame_stride: PositiveInt = 1

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        issues: list[RecipeIssue] = _stream_issues(self)
        if self.source in ("image_folder", "webdataset"):
            if self.path is None:
                issues.append(
                    issue(
                        "path",
                        f"required for source: {self.source}",
                        hint=_PATH_HINTS[self.source],
                    )
                )
            if (self.resolution is None) == (self.buckets is None):
                issues.append(
                    issue(
                        "resolution",
                        f"source: {self.source} needs exactly one of data.resolution or data.buckets",
                        {"resolution": self.resolution, "buckets": self.buckets} if self.buckets else MISSING,
                        hint=(
                            "Set data.resolution to the image size fed to the teacher (e.g. 512 for SD1.5), or "
                            "data.buckets to a preset (sdxl, sd15) or a list of [height, width] shapes."
                        ),
                    )
                )
            if self.prompts is not None:
                issues.append(
                    issue(
                        "prompts",
                        f"not used with source: {self.source}",
                        self.prompts,
                        hint=("Captions come with the images (data.caption_column); remove data.prompts."),
                    )
                )
        elif self.source == "prompts":
            if (self.path is None) == (self.prompts is None):
                given = {"prompts": self.prompts, "path": self.path} if self.path else MISSING
                issues.append(
                    issue(
                        "prompts",
                        "source: prompts needs exactly one of data.prompts or data.path",
                        given,
                        hint=(
                            "Give a list (data.prompts: [...]) or a text file with one prompt "
                            "per line (data.path), not both."
                        ),
                    )
                )
        elif self.source == "tensors":
            if self.path is None:
                issues.append(
                    issue(
                        "path",
                        "required for source: tensors",
                        hint="Set data.path to a safetensors file with x0 [n, ...] and optionally class_labels [n].",
                    )
                )
            for key in ("prompts", "resolution"):
                if getattr(self, key) is not None:
                    issues.append(
                        issue(key, "not used with source: tensors", getattr(self, key), hint=f"Remove data.{key}.")
                    )
        elif self.source == "pairs":  # reflow couplings written by fewstep.data.reflow (noise, sample, condition)
            if self.path is None:
                issues.append(
                    issue("path", "required for source: pairs",
                          hint="Set data.path to a pair directory written by `fewstep pairs`.")
                )  # fmt: skip
            for key in ("prompts", "resolution"):
                if getattr(self, key) is not None:
                    issues.append(
                        issue(key, "not used with source: pairs", getattr(self, key), hint=f"Remove data.{key}.")
                    )
        elif self.source == "cache":  # written by `fewstep cache` from image_folder or prompts data
            if self.path is None:
                issues.append(
                    issue("path", "required for source: cache",
                          hint="Set data.path to a directory written by `fewstep cache RECIPE`.")
                )  # fmt: skip
            if self.prompts is not None:
                issues.append(
                    issue("prompts", "not used with source: cache", self.prompts,
                          hint="The cache holds its prompts' embeddings already; remove data.prompts.")
                )  # fmt: skip
        elif self.source == "fashion_mnist":  # path: optional directory of the idx files
            for key in ("prompts", "resolution"):
                if getattr(self, key) is not None:
                    issues.append(
                        issue(
                            key, "not used with source: fashion_mnist", getattr(self, key), hint=f"Remove data.{key}."
                        )
                    )
        else:  # digits, moving_digits: built from scikit-learn's digits
            for key in ("path", "prompts"):
                if getattr(self, key) is not None:
                    issues.append(
                        issue(key, f"not used with source: {self.source}", getattr(self, key),
                              hint=f"Remove data.{key}.")
                    )  # fmt: skip
        raise_issues(issues)
        return self


VIDEO_SOURCES = ("image_folder", "webdataset", "prompts", "cache", "moving_digits")  # what data.num_frames applies to
_PATH_HINTS = {
    "image_folder": "Set data.path to a folder of images with a metadata.jsonl (file_name, text).",
    "webdataset": "Set data.path to shards: a pattern (shards/train-{000000..000009}.tar), a directory or a list.",
}


def _stream_issues(data: DataConfig) -> list[RecipeIssue]:
    """The keys only some sources read (a list of paths, buckets, video frames), and the shape of ``buckets``."""
    issues = []
    if isinstance(data.path, list) and data.source != "webdataset":
        issues.append(issue("path", f"a list of paths is only for source: webdataset, not {data.source}", data.path))
    if data.buckets is not None and data.source not in ("image_folder", "webdataset"):
        issues.append(
            issue("buckets", f"not used with source: {data.source}", data.buckets, hint="Remove data.buckets.")
        )
    if data.num_frames is not None and data.source not in VIDEO_SOURCES:
        issues.append(issue("num_frames", f"not used with source: {data.source}", data.num_frames,
                            hint=f"Only source {'/'.join(VIDEO_SOURCES)} reads it; remove it."))  # fmt: skip
    if data.num_frames is not None and data.source == "image_folder" and data.buckets is not None:
        issues.append(issue("buckets", "not used with a video folder (source: image_folder with data.num_frames)",
                            data.buckets, hint="Give data.resolution: every clip is cropped to it."))  # fmt: skip
    if isinstance(data.buckets, str):
        from fewstep.data.buckets import PRESETS  # lazy: the CLI starts without the data layer

        if data.buckets not in PRESETS:
            hint = did_you_mean(data.buckets, list(PRESETS)) or "Or list [height, width] shapes."
            issues.append(issue("buckets", "unknown bucket preset", data.buckets, ", ".join(PRESETS), hint))
    elif data.buckets is not None:
        lengths = {len(b) for b in data.buckets}
        if lengths - {2, 3} or len(lengths) > 1:
            issues.append(issue("buckets", "every bucket is [height, width] (or [frames, height, width] for video), "
                                "all of one kind", data.buckets))  # fmt: skip
        elif lengths == {3} and (data.source != "webdataset" or data.num_frames is not None):
            issues.append(issue("buckets", "[frames, height, width] buckets are for video from source: webdataset, "
                                "and give the frames in place of data.num_frames", data.buckets))  # fmt: skip
    return issues


class OptimConfig(BaseModel):
    """AdamW and its learning-rate schedule; ``group_lr`` overrides ``lr`` per trainable group name."""

    model_config = BLOCK

    lr: PositiveFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0.0)
    eps: PositiveFloat = 1e-8
    grad_clip: PositiveFloat | None = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    group_lr: dict[str, PositiveFloat] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _warmup_is_used(self) -> OptimConfig:
        if self.lr_scheduler == "constant" and self.warmup_steps > 0:
            raise_issues(
                [
                    issue(
                        "warmup_steps",
                        "is ignored by lr_scheduler: constant",
                        self.warmup_steps,
                        hint="Use lr_scheduler: constant_with_warmup, or set warmup_steps: 0.",
                    )
                ]
            )
        return self


TrackerName = Literal["tensorboard", "wandb", "aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "trackio"]


class AlarmsConfig(BaseModel):
    """Collapse alarms (``fewstep.train.alarms``): a warning in the log and ``alarm/<name>`` on the trackers, once per
    episode, when a run drifts into a known failure mode. Ratios compare with the run's own early values."""

    model_config = BLOCK

    enabled: bool = True
    warmup_steps: int = Field(100, ge=0)  # trainer steps before the fake/real gap reference is taken
    window: PositiveInt = 10  # gap observations whose median is the reference (the first ones) and the current value
    gap_explode: float = Field(10.0, gt=1.0)  # alarm when the gap (dm_grad_norm) exceeds this × its reference
    gap_collapse: float = Field(0.1, gt=0.0, lt=1.0)  # alarm when it falls below this × its reference
    washed_out_std_ratio: float = Field(0.5, gt=0.0, lt=1.0)  # alarm when std_ratio (student/teacher) is below
    washed_out_after: int = Field(300, ge=0)  # trainer steps before std_ratio is checked (one-step starts are blurred)
    variance_collapse: float = Field(0.25, gt=0.0, lt=1.0)  # seed variance of a sample row / its first grid's
    saturation_share: float = Field(0.85, gt=0.0, le=1.0)  # share of pixels within saturation_margin of 0 or 1
    saturation_margin: float = Field(0.01, ge=0.0, lt=0.5)
    solid_std: float = Field(0.01, ge=0.0)  # a sample whose pixel std is below this is a solid frame
    solid_share: float = Field(0.25, gt=0.0, le=1.0)  # alarm when at least this share of a grid's samples are solid


class FSDPConfig(BaseModel):
    """FSDP2 sharding of every backbone of the run (``fewstep.train.sharding``), launched with plain ``accelerate
    launch --multi_gpu`` or torchrun. Without this block, an ``accelerate launch`` with an FSDP2 config file shards
    with that file's settings."""

    model_config = BLOCK

    enabled: bool = True
    reshard_after_forward: bool = Field(
        True, description="full shard (ZeRO-3); false: shard gradients and optimizer state only (ZeRO-2)"
    )
    replicate: PositiveInt = Field(1, description="hybrid shard: replica groups, each sharding over world/replicate")
    cpu_offload: bool = False
    activation_checkpointing: bool = False


class TrainConfig(BaseModel):
    """The training loop. ``resume``: ``auto`` (newest complete checkpoint), ``never``, or a checkpoint path.

    Guards: a step whose loss or gradient is non-finite, or whose update leaves a trainable weight non-finite or above
    ``max_weight_abs``, is undone (``rollback``: the weights copied before the step come back);
    more than ``max_nonfinite`` such steps in a row stop the run. ``overwrite``: with ``resume: never``, an
    ``output_dir`` holding checkpoints is moved aside to ``<output_dir>.old-<time>`` instead of refused. ``log_with``:
    accelerate's trackers, one name or a list (``fewstep validate`` names the package of one not installed)."""

    model_config = BLOCK

    max_steps: PositiveInt = 1000
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = Field(0, ge=0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="diffusers EMAModel's decay warmup: min(ema_decay, (1 + k)/(10 + k))")
    checkpoint_every: PositiveInt = 500
    keep_last: PositiveInt = 3
    resume: str = Field("auto", min_length=1)
    log_every: PositiveInt = 10
    sample_every: PositiveInt | None = 500
    sample_steps: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    num_sample_images: PositiveInt = 16
    max_nonfinite: int = Field(10, ge=0)  # bad steps in a row (loss, gradient or weights) tolerated before stopping
    max_weight_abs: PositiveFloat = 1e4  # an update leaving any trainable weight above this is a bad step
    rollback: bool = True  # keep a copy of the phase's weights to undo a bad step
    overwrite: bool = False  # resume: never on a used output_dir moves the earlier run aside instead of refusing
    progress: bool = True
    log_with: list[TrackerName] = Field(default_factory=lambda: ["tensorboard"])  # accelerate trackers; [] = none
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    fsdp: FSDPConfig | None = None
    seed_per_microbatch: bool = Field(
        False,
        description="re-seed the RNG before every micro-batch from (seed, step, global micro-batch index): N "
        "processes draw the same noise as 1 process with N-fold gradient accumulation",
    )

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


EvalMetricName = Literal["fid", "accuracy", "inception_fid", "clip", "diversity", "precision", "recall"]  # eval.suite


class EvalConfig(BaseModel):
    """Periodic evaluation: every ``every_steps`` (None = only when asked), at each student step count; scalars
    ``eval/<metric>@<steps>`` and the best checkpoint by ``best_metric`` at ``best_steps`` (``checkpoints/best``)."""

    model_config = BLOCK

    every_steps: PositiveInt | None = None
    steps: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    num_samples: PositiveInt = 256
    metrics: list[EvalMetricName] | None = None  # None: benchmark teachers: fid, accuracy, precision, recall, diversity
    best_metric: EvalMetricName | None = None  # None: the first metric
    best_steps: PositiveInt | None = None  # None: the largest of `steps`
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: the metric's own direction (FID min, accuracy max)
    batch_size: PositiveInt = 64
    seed: int = Field(0, ge=0)
    prompts: list[str] | None = Field(None, min_length=1)  # text models; default: data.prompts, else built-in ones
    save_images: bool = False  # one PNG per image under <run>/eval/step_XXXXXXXX/images (grids are always written)

    @model_validator(mode="after")
    def _best_is_measured(self) -> EvalConfig:
        issues: list[RecipeIssue] = []
        if self.best_steps is not None and self.best_steps not in self.steps:
            issues.append(
                issue("best_steps", f"is not one of eval.steps {self.steps}", self.best_steps,
                      hint="Add it to eval.steps or pick one of them.")
            )  # fmt: skip
        if self.best_metric is not None and self.metrics is not None and self.best_metric not in self.metrics:
            issues.append(
                issue("best_metric", f"is not one of eval.metrics {self.metrics}", self.best_metric,
                      hint="Add it to eval.metrics or pick one of them.")
            )  # fmt: skip
        raise_issues(issues)
        return self


class ExportConfig(BaseModel):
    """Which artifacts ``fewstep export`` writes: diffusers LoRA, a merged pipeline, ComfyUI/kohya LoRA keys."""

    model_config = BLOCK

    lora: bool = True
    merged: bool = False
    kohya: bool = False


class Recipe(BaseModel):
    """A whole recipe. ``objective`` is the registered objective's own ``Config`` instance."""

    model_config = BLOCK

    description: str = ""
    teacher: TeacherConfig
    student: StudentConfig = Field(default_factory=StudentConfig)
    objective: SerializeAsAny[BaseModel]
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output_dir: str = Field(min_length=1)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_config(cls, value: Any) -> BaseModel:
        return objective_config(value)


def objective_names() -> list[str]:
    """Names of every registered objective (importing ``fewstep.objectives`` registers the shipped ones)."""
    from fewstep.objectives import OBJECTIVES  # lazy: torch is only needed once an objective is validated

    return OBJECTIVES.names()


def objective_config(value: Any) -> BaseModel:
    """Validate an ``objective`` block (``{name: ..., <fields>}``) into the named objective's ``Config``.

    Raises issues relative to the block (``name``, ``w_min``, ...) that ``Recipe`` reports under ``objective.``.
    """
    from fewstep.objectives import OBJECTIVES

    names = OBJECTIVES.names()
    choices = ", ".join(repr(n) for n in names) or "(none registered)"
    if isinstance(value, BaseModel):
        name = getattr(value, "name", None)
        if isinstance(name, str) and name in OBJECTIVES and isinstance(value, OBJECTIVES.get(name).Config):
            return value
        value = value.model_dump()
    if not isinstance(value, dict):
        raise_issues(
            [issue((), "should be a block with `name:` and the objective's own keys", value, f"name: {choices}")]
        )
    name = value.get("name", MISSING)
    if name is MISSING:
        raise_issues([issue("name", "required key is missing", allowed=choices)])
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise_issues(
            [
                issue(
                    "name",
                    "unknown objective",
                    name,
                    choices,
                    did_you_mean(name, names) or "Pick one of the registered objectives.",
                )
            ]
        )
    config_cls = OBJECTIVES.get(name).Config
    try:
        config = config_cls.model_validate(value)
    except ValidationError as err:
        raise_issues(issues_from_validation(err, config_cls))
        raise  # unreachable: a ValidationError always holds at least one error
    raise_issues(nonfinite_issues(config))
    return config


def nonfinite_issues(value: Any, loc: tuple[str | int, ...] = ()) -> list[RecipeIssue]:
    """An issue at each infinite or NaN number in a validated value: the fields of blocks, the items of lists, tuples
    and mappings, walked all the way down (``loc``: the key path of ``value``)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [issue(loc, FINITE, value)]
    if isinstance(value, BaseModel):
        return [i for key in type(value).model_fields for i in nonfinite_issues(getattr(value, key), (*loc, key))]
    if isinstance(value, dict):
        return [i for key, item in value.items() for i in nonfinite_issues(item, (*loc, str(key)))]
    if isinstance(value, list | tuple):
        return [i for k, item in enumerate(value) for i in nonfinite_issues(item, (*loc, k))]
    return []
