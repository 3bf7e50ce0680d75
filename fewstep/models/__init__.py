"""Denoiser (backbone adapters), Teacher (+CFG), Student (LoRA/full), Conditioning."""

from fewstep.models.conditioning import Conditioning
from fewstep.models.denoiser import BACKBONES, Denoiser
from fewstep.models.student import Student, adapters_disabled
from fewstep.models.teacher import GUIDANCE_CONVENTION, Teacher

__all__ = ["BACKBONES", "GUIDANCE_CONVENTION", "Conditioning", "Denoiser", "Student", "Teacher", "adapters_disabled"]
