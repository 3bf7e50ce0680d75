"""The model card of an image-to-video student: its snippet calls ``WanImageToVideoPipeline`` with the first frame
(``pipe(image=..., prompt=...)``) and parses as Python; text-to-video pipelines keep the prompt-only call."""

from __future__ import annotations

import ast
import re
from types import SimpleNamespace

from fewstep.export.card import render_card, takes_first_frame
from fewstep.models.loading import load_teacher
from fewstep.models.student import Student
from fewstep.objectives.dmd.dmd2 import DMD2, DMD2Config
from tests.helpers import single_thread  # noqa: F401 (fixture)


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_image_to_video_card_passes_the_first_frame():
    teacher = load_teacher(SimpleNamespace(pretrained="tiny:wan21_i2v"))
    objective = DMD2(DMD2Config(num_student_steps=4, health_reference_steps=0), teacher, Student.lora(teacher, rank=4))
    spec = objective.sampling_spec()
    assert takes_first_frame("WanImageToVideoPipeline") and not takes_first_frame("WanPipeline")

    base = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    card = render_card(spec, pipeline_class="WanImageToVideoPipeline", base_model=base, student_path="runs/i2v/export",
                       lora=True)  # fmt: skip
    code = snippet(card)
    ast.parse(code)
    assert "pipeline_tag: image-to-video" in card
    assert 'image = load_image("first_frame.png")' in code
    imports = "from diffusers import WanImageToVideoPipeline, FlowMatchEulerDiscreteScheduler\n"
    assert imports + "from diffusers.utils import load_image\n" in code
    assert 'video = pipe(image=image, prompt="a photo of a cat", ' in code and ".frames[0]" in code

    text = snippet(render_card(spec, pipeline_class="WanPipeline", base_model="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                               student_path="runs/t2v/export", lora=True))  # fmt: skip
    assert 'video = pipe("a photo of a cat", ' in text and "image=" not in text
