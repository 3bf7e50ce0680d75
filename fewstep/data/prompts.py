"""Prompt sets for data-free objectives: an inline list in the recipe or a text file with one prompt per line."""

from __future__ import annotations

from pathlib import Path


class PromptDataset:
    """A list of prompts; ``dataset[i]`` is the i-th prompt. Empty lines of a file are skipped.

    Args:
        prompts: prompts given inline (``data.prompts``).
        path: a UTF-8 text file with one prompt per line (``data.path``); used when ``prompts`` is not given.
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
            items = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise ValueError("data.source=prompts needs data.prompts (a list) or data.path (a text file).")
        if not items:
            raise ValueError(f"The prompt set is empty (data.prompts={prompts!r}, data.path={path!r}).")
        self.prompts = items

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]
