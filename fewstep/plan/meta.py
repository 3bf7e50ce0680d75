"""A recipe's teacher, student and objective built on the meta device: every module and parameter with its real
shape and dtype, no storage, nothing loaded.

The pipeline is the recipe's own diffusers pipeline class, built from its components' configs (``fewstep.plan.sources``)
under ``accelerate.init_empty_weights``; the teacher, student and objective are then built by the same code that
builds them for training (``fewstep.train.build.build_components``), so every role the objective adds (a fake score
as a second adapter or a full copy, a GAN head, experts, target networks, adapters) exists here exactly as it would
on the GPU, only without storage.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fewstep.models.backbones import ADAPTER_BY_CLASS, WanExperts, pipeline_backbone
from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import Denoiser
from fewstep.models.families import FAMILIES, FLOW_TIMESTEP_SCALE, detect_family, schedule_and_prediction
from fewstep.models.loading import encoder_components, quiet_loading, to_dtype
from fewstep.models.teacher import Teacher
from fewstep.plan.sources import INDEX, config_directory
from fewstep.train.build import Components, build_components

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe

LIBRARIES = ("diffusers", "transformers")


@dataclass
class MetaModels:
    """What a recipe trains, on the meta device.

    Attributes:
        pipeline: the teacher's diffusers pipeline (components on the meta device, no tokenizers).
        components: teacher, student and objective as ``build_components`` makes them.
        family: the teacher's family (``custom`` for a backbone fewstep has no adapter for yet).
        source: where the configs came from (``local``, ``shipped``, ``cache``) and the directory.
        notes: what the caller should know (e.g. a backbone fewstep cannot train yet).
    """

    pipeline: Any
    components: Components
    family: str
    source: str
    notes: list[str] = field(default_factory=list)


def meta_component(directory: Path, library: str, class_name: str, dtype: Any) -> Any:
    """One pipeline component from ``directory/config.json`` on the meta device in ``dtype`` (a scheduler from its
    ``scheduler_config.json``); None for components without a config here (tokenizers, feature extractors)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    if library not in LIBRARIES or not directory.is_dir():
        return None
    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"{library} has no class {class_name!r} (named in {directory.parent / INDEX}); upgrade it.")
    if library == "diffusers" and issubclass(cls, diffusers.SchedulerMixin):
        return cls.from_config(cls.load_config(directory))
    if not (directory / "config.json").is_file():
        return None
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            model = cls.from_config(cls.load_config(directory))
        else:
            model = cls._from_config(cls.config_class.from_pretrained(directory))
    return model.to(dtype).eval().requires_grad_(False)


def meta_pipeline(directory: Path, dtype: Any) -> Any:
    """The pipeline of ``directory`` (its ``model_index.json`` class) with every component on the meta device."""
    import diffusers

    index = json.loads((directory / INDEX).read_text())
    pipeline_cls = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_cls is None:
        raise ValueError(
            f"{directory / INDEX} names the pipeline class {index.get('_class_name')!r}, which diffusers does not have."
        )
    components = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] is not None:
            components[name] = meta_component(directory / name, value[0], value[1], dtype)
        elif not isinstance(value, list):
            components[name] = value  # a pipeline setting (requires_safety_checker, ...)
    signature = inspect.signature(pipeline_cls.__init__).parameters
    kwargs = {name: components.get(name) for name in signature if name != "self"}
    kwargs = {k: v for k, v in kwargs.items() if k in components or signature[k].default is inspect.Parameter.empty}
    pipeline = pipeline_cls(**kwargs)
    from fewstep.testing import apply_resolution_marker

    apply_resolution_marker(pipeline, directory)  # tiny zoo directories record their default resolution
    return pipeline


def meta_teacher(pipeline: Any, guidance_scale: float) -> tuple[Teacher, str, list[str]]:
    """A ``Teacher`` over the meta pipeline's backbone (as ``load_teacher`` builds it: Wan 2.2's two experts as one
    ``WanExperts``), its family and notes."""
    backbone = pipeline_backbone(pipeline)
    notes = []
    try:
        family = detect_family(pipeline)
    except ValueError:
        family = "custom"
        notes.append(
            f"fewstep has no backbone adapter for {type(backbone).__name__} yet: this plan counts its memory, but "
            "training it needs one (`Teacher.from_module(..., adapter=...)`)."
        )
    if family == "wan22":
        backbone = WanExperts.from_pipeline(pipeline)
    # memory does not depend on what the backbone is fed as its timestep: any flow scale serves unknown families
    schedule, prediction = schedule_and_prediction(
        pipeline.scheduler, family if family in FLOW_TIMESTEP_SCALE else "sd3"
    )
    adapter = ADAPTER_BY_CLASS.get(type(backbone).__name__, "custom")
    denoiser = Denoiser(backbone, schedule, prediction, adapter)
    return Teacher(denoiser, guidance_scale, pipeline, Conditioning(), family), family, notes


def config_teacher(pretrained: str, revision: str | None = None) -> Teacher | None:
    """The teacher ``pretrained`` names, built from its configs alone on the meta device (``meta_pipeline``,
    ``meta_teacher``): its family and its pipeline's shape rules (VAE factors, patch sizes, default video size) without
    a weight, for checks before anything loads (``fewstep validate``). ``None`` when this machine has no configs for it
    (``config_directory``) or they name a class this diffusers lacks."""
    try:
        directory, _ = config_directory(pretrained, revision)
        with quiet_loading(), quiet_diffusers():  # validate prints its verdict alone
            pipeline = meta_pipeline(directory, torch.float32)
    except (OSError, ValueError, ImportError):  # no configs here, or configs this diffusers cannot build
        return None
    return meta_teacher(pipeline, 1.0)[0]


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings off for the block (casting a meta model with ``to(dtype)`` warns about fp32 modules even
    when there are none)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def build_meta_models(recipe: Recipe) -> MetaModels:
    """The recipe's pipeline, teacher, student and objective on the meta device (seconds, no weights).

    Raises:
        FileNotFoundError: the teacher's configs are not on this machine (``fewstep.plan.sources``).
        ValueError: the recipe does not fit the teacher (the objective's own check, as in training).
    """
    directory, where = config_directory(recipe.teacher.pretrained, recipe.teacher.revision)
    with quiet_diffusers():
        pipeline = meta_pipeline(directory, to_dtype(recipe.teacher.dtype))
    if recipe.data.source == "cache":  # training from a cache leaves the text encoders and the VAE on disk
        for name in encoder_components(json.loads((directory / INDEX).read_text())):
            setattr(pipeline, name, None)
    teacher, family, notes = meta_teacher(pipeline, float(recipe.teacher.guidance_scale))
    wanted = recipe.teacher.family
    if wanted not in ("auto", family) and family in FAMILIES:
        raise ValueError(
            f"teacher.family is {wanted!r} but {recipe.teacher.pretrained!r} is a {family} pipeline. Set "
            f"teacher.family to 'auto' or {family!r}."
        )
    # New tensors default to the meta device (LoRA layers, heads, a backbone rebuilt with an extra embedding). Not
    # init_empty_weights: it re-registers every parameter as a new object, which would split the parameters an adapter
    # role shares with the backbone.
    with torch.device("meta"):
        components = build_components(recipe, teacher=teacher)
    return MetaModels(pipeline, components, family, f"{where}: {directory}", notes)
