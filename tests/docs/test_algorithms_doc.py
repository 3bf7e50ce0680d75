"""docs/algorithms.md against the code: a section for every registered objective, and every `| field | default |`
row equal to the pydantic default of that objective's recipe block. Every field has a row in its own section, or, for
a block that extends another objective's (rCM and TBCM extend sCM's), in that objective's section with the same
default. Links inside docs/ point at files and headings that exist, and the reference curves at small PNGs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fewstep.objectives import OBJECTIVES

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC = DOCS / "algorithms.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|")


def sections(text: str) -> dict[str, str]:
    """``## <name>`` headings and the text up to the next ``## ``."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def default_rows(body: str) -> dict[str, str]:
    """``{field: default text}`` of the tables whose header starts ``| field | default |``."""
    rows: dict[str, str] = {}
    in_table = False
    for line in body.splitlines():
        if re.match(r"^\|\s*field\s*\|\s*default\s*\|", line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        found = ROW.match(line)
        if in_table and found:
            assert found.group(1) not in rows, f"{found.group(1)} has two rows"
            rows[found.group(1)] = found.group(2)
    return rows


def stated(text: str) -> Any:
    return "required" if text == "required" else yaml.safe_load(text)


def actual(field: Any) -> Any:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return list(value) if isinstance(value, tuple) else value


def same(a: Any, b: Any) -> bool:
    """Equal, numbers to float precision (``5`` and ``5.0`` alike), booleans and ``None`` exactly."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return type(a) is type(b) and a == b


def owner(config: type) -> dict[type, str]:
    """The registered objective name of each recipe block ``config`` extends (its own first)."""
    names = {OBJECTIVES.get(n).Config: n for n in OBJECTIVES.names()}
    return {base: names[base] for base in config.__mro__ if base in names}


SECTIONS = sections(DOC.read_text(encoding="utf-8"))


def test_every_registered_objective_has_a_section():
    missing = [name for name in OBJECTIVES.names() if name not in SECTIONS]
    assert not missing, f"docs/algorithms.md has no '## <name>' section for {missing}"


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_stated_default_is_the_codes_and_every_field_is_stated(name):
    config = OBJECTIVES.get(name).Config
    fields = {k: f for k, f in config.model_fields.items() if k != "name"}
    rows = default_rows(SECTIONS[name])
    unknown = sorted(set(rows) - set(fields))
    assert not unknown, f"{name}: rows for fields the recipe block does not have: {unknown}"
    for key, text in rows.items():
        assert same(stated(text), actual(fields[key])), f"{name}.{key}: doc says {text!r}, code {actual(fields[key])!r}"
    for key in sorted(set(fields) - set(rows)):  # documented where the field comes from, with the same default
        inherited = [
            default_rows(SECTIONS[other]).get(key)
            for base, other in owner(config).items()
            if base is not config and key in base.model_fields
        ]
        inherited = [text for text in inherited if text is not None]
        assert inherited, f"{name}.{key} has no row in docs/algorithms.md (its section or a base objective's)"
        assert same(stated(inherited[0]), actual(fields[key])), (
            f"{name}.{key}: its default differs from the base section's {inherited[0]!r}; give it a row of its own"
        )


def test_each_section_cites_papers_by_arxiv_id():
    for name in OBJECTIVES.names():
        assert re.search(r"\*\*Papers\.\*\*.*arXiv \d{4}\.\d{4,5}", SECTIONS[name], flags=re.S), name


def test_links_between_the_docs_point_at_files_and_headings_that_exist():
    def anchors(path: Path) -> set[str]:
        out = set()
        for heading in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M):
            slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            out.add(slug)
        return out

    for doc in (DOC, DOCS / "curves.md"):
        for target, anchor in re.findall(r"\]\(([\w./]*?\.md)?(?:#([\w\-]+))?\)", doc.read_text(encoding="utf-8")):
            path = DOCS / target if target else doc
            assert path.is_file(), f"{doc.name}: link to missing {target}"
            if anchor:
                assert anchor in anchors(path), f"{doc.name}: no heading #{anchor} in {path.name}"
        for image in re.findall(r"\]\(([\w./]+\.png)\)", doc.read_text(encoding="utf-8")):
            assert (DOCS / image).is_file(), f"{doc.name}: image {image} is missing (python scripts/curves.py RUN_DIR)"
            assert (DOCS / image).stat().st_size < 100_000, f"{image} is over 100 KB"
