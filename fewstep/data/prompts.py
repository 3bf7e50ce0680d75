"""Prompt sets for data-free objectives and evaluation: an inline list in the recipe, a text file with one prompt per
line, or a JSON-lines file with one ``{"prompt": ...}`` object per line (``.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-empty line, or for ``.jsonl`` files the ``"prompt"`` of each line's JSON
    object (other keys are ignored).

    Raises:
        ValueError: a ``.jsonl`` line that is not a JSON object with a string ``"prompt"`` (names the line).
    """
    file = Path(path)
    lines = [(n, line.strip()) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if file.suffix.lower() != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{n} is not JSON ({err.msg}); a .jsonl prompt file holds one "
                             '{"prompt": "..."} object per line.') from None  # fmt: skip
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{file}:{n} has no string "prompt" (a .jsonl prompt file holds one {{"prompt": "..."}} '
                             "object per line).")  # fmt: skip
        prompts.append(row["prompt"].strip())
    return prompts


class PromptDataset:
    """A list of prompts; ``dataset[i]`` is the i-th prompt. Empty lines of a file are skipped.

    Args:
        prompts: prompts given inline (``data.prompts``).
        path: a UTF-8 text file with one prompt per line, or a ``.jsonl`` file of ``{"prompt": ...}`` objects
            (``data.path``); used when ``prompts`` is not given.
    """

    def __init__(self, prompts: list[str] | None = None, path: str | Path | None = None) -> None:
        if prompts:
            items = [str(p) for p in prompts]
        elif path is not None:
            file = Path(path)
            if not file.is_file():
                raise FileNotFoundError(
                    f"Prompt file {str(file)!r} does not exist. Set data.path to a text file with one prompt per "
                    "line, or list them inline under data.prompts."
                )
            items = read_prompt_file(file)
        else:
            raise ValueError("data.source=prompts needs data.prompts (a list) or data.path (a text file).")
        if not items:
            raise ValueError(f"The prompt set is empty (data.prompts={prompts!r}, data.path={path!r}).")
        self.prompts = items

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]
