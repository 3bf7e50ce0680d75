"""Prompt sets for data-free objectives and evaluation: an inline list in the recipe, a text file with one prompt per
line, or a JSON-lines file with one ``{"prompt": ...}`` object per line (``.jsonl``). A ``.jsonl`` line may name the
first frame of its clip for image-to-video teachers: ``{"prompt": ..., "image": "frames/0001.png"}``, the path relative
to the file."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_KEY = "image"  # a .jsonl prompt line's first frame (image-to-video teachers)


def read_prompt_rows(path: str | Path) -> list[tuple[str, Path | None]]:
    """``(prompt, first frame or None)`` for each prompt of a file: one per non-empty line, or for ``.jsonl`` files
    the ``"prompt"`` of each line's JSON object and its ``"image"`` (a path relative to the file), if any; other keys
    are ignored.

    Raises:
        ValueError: a ``.jsonl`` line that is not a JSON object with a string ``"prompt"``, or whose ``"image"`` is not
            a string (names the line).
        FileNotFoundError: an ``"image"`` that is not a file (names the line).
    """
    file = Path(path)
    lines = [(n, line.strip()) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if file.suffix.lower() != ".jsonl":
        return [(line, None) for _, line in lines]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{n} is not JSON ({err.msg}); a .jsonl prompt file holds one "
                             '{"prompt": "..."} object per line.') from None  # fmt: skip
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{file}:{n} has no string "prompt" (a .jsonl prompt file holds one {{"prompt": "..."}} '
                             "object per line).")  # fmt: skip
        image = row.get(IMAGE_KEY)
        if image is not None and not isinstance(image, str):
            raise ValueError(f'{file}:{n}: "{IMAGE_KEY}" is {image!r}; it is the path of the first frame (a string, '
                             "relative to the file).")  # fmt: skip
        if image is not None:
            image = (file.parent / image).expanduser()
            if not image.is_file():
                raise FileNotFoundError(f'{file}:{n} names the image {row[IMAGE_KEY]!r}, which is not a file '
                                        f"({image}).")  # fmt: skip
        rows.append((row["prompt"].strip(), image))
    return rows


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file (``read_prompt_rows`` without the images)."""
    return [prompt for prompt, _ in read_prompt_rows(path)]


class PromptDataset:
    """A list of prompts; ``dataset[i]`` is the i-th prompt, ``images`` the first frame of each (``None`` when the set
    names none). Empty lines of a file are skipped.

    Args:
        prompts: prompts given inline (``data.prompts``).
        path: a UTF-8 text file with one prompt per line, or a ``.jsonl`` file of ``{"prompt": ...}`` objects, each
            optionally with its first frame, ``"image"`` (``data.path``); used when ``prompts`` is not given.

    Raises:
        ValueError: no prompts, or a ``.jsonl`` file where some lines name an image and others do not.
    """

    def __init__(self, prompts: list[str] | None = None, path: str | Path | None = None) -> None:
        rows: list[tuple[str, Path | None]]
        if prompts:
            rows = [(str(p), None) for p in prompts]
        elif path is not None:
            file = Path(path)
            if not file.is_file():
                raise FileNotFoundError(
                    f"Prompt file {str(file)!r} does not exist. Set data.path to a text file with one prompt per "
                    "line, or list them inline under data.prompts."
                )
            rows = read_prompt_rows(file)
        else:
            raise ValueError("data.source=prompts needs data.prompts (a list) or data.path (a text file).")
        if not rows:
            raise ValueError(f"The prompt set is empty (data.prompts={prompts!r}, data.path={path!r}).")
        self.prompts = [prompt for prompt, _ in rows]
        named = [image is not None for _, image in rows]
        if any(named) and not all(named):
            raise ValueError(
                f'{path}: {named.count(True)} of {len(rows)} lines name an "{IMAGE_KEY}" (a first frame): give every '
                "line one, or none (a batch is all image-to-video or all text-to-video)."
            )
        self.images: list[Path] | None = [image for _, image in rows] if all(named) else None  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


# A small, varied prompt set for a first run when you have none of your own (``fewstep data`` writes it, and draws a
# starter image folder from the teacher with it). For a real distillation, use prompts from your own domain.
STARTER_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a golden retriever running on a beach at sunset",
    "a red bicycle leaning against a brick wall",
    "a bowl of ramen with a soft-boiled egg, top view",
    "a lighthouse on a rocky coast during a storm",
    "a snowy mountain lake at sunrise, reflections on the water",
    "a city street at night with neon signs and rain",
    "a watercolor painting of a small village in the hills",
    "an astronaut riding a horse, digital art",
    "a close-up portrait of an old fisherman, natural light",
    "a cozy living room with a fireplace and bookshelves",
    "a field of sunflowers under a blue sky",
    "a steam locomotive crossing a stone bridge",
    "a plate of fresh fruit on a wooden table",
    "a hummingbird drinking from a red flower, macro photo",
    "a futuristic city skyline with flying cars",
    "an oil painting of a ship on rough seas",
    "a fox in a snowy forest",
    "a cup of coffee with latte art on a cafe table",
    "a medieval castle on a hill at dusk",
    "a pencil sketch of a sleeping dog",
    "a tropical beach with palm trees and turquoise water",
    "a vintage car parked in front of a diner",
    "a stack of pancakes with berries and syrup",
    "a koi pond in a Japanese garden",
    "a desert landscape with sand dunes and a camel caravan",
    "a robot reading a book in a library",
    "a bouquet of tulips in a glass vase",
    "a waterfall in a green rainforest",
    "a cyberpunk portrait of a woman with glowing tattoos",
    "a wooden cabin by a lake in autumn",
    "a hot air balloon over a patchwork of fields",
    "an owl perched on a branch at night",
    "a bustling market street with colorful stalls",
    "a minimalist living room with a large window",
    "a sailboat on a calm sea at golden hour",
    "a chocolate cake with strawberries on top",
    "a panda eating bamboo",
    "a cathedral interior with stained glass windows",
    "a pixel art landscape with mountains and a river",
    "a child flying a kite in a park",
    "an aerial view of a winding river through a forest",
    "a teapot and cups on a tray, still life",
    "a jellyfish glowing in the deep ocean",
    "a horse galloping through a meadow",
    "a lantern-lit alley in an old town",
    "a bowl of salad with avocado and tomatoes",
    "a mountain road with a red sports car",
)


def write_prompt_file(path: str | Path, prompts: list[str] | tuple[str, ...] = STARTER_PROMPTS) -> Path:
    """Write ``prompts`` to ``path``, one a line (what ``data.source: prompts`` reads back with ``data.path``).

    Raises:
        FileExistsError: ``path`` exists already (it is never overwritten).
        ValueError: no prompts, or a prompt that holds a line break.
    """
    file = Path(path).expanduser()
    if file.exists():
        raise FileExistsError(f"{str(file)!r} exists already; it is never overwritten (remove it or pick another).")
    items = [str(p).strip() for p in prompts if str(p).strip()]
    if not items:
        raise ValueError("No prompts to write.")
    if any("\n" in p or "\r" in p for p in items):
        raise ValueError("A prompt holds a line break: one prompt a line cannot hold it.")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(items) + "\n", encoding="utf-8")
    return file
