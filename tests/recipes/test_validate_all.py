"""Every shipped recipe under recipes/ validates, round-trips through its resolved YAML and is listed by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.config import dump_recipe, list_recipes, load_recipe
from fewstep.config.load import LAUNCH_CONFIG_DIR, recipe_description

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.relative_to(RECIPES_DIR).parts[0] != LAUNCH_CONFIG_DIR)


def recipe_id(path: Path) -> str:
    return path.relative_to(RECIPES_DIR).with_suffix("").as_posix()


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_shipped_recipe_validates(path: Path, tmp_path: Path):
    recipe = load_recipe(path)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_recipe(recipe))
    assert load_recipe(resolved) == recipe
    assert recipe_description(path), f"{recipe_id(path)} needs a `description:` (shown by `fewstep recipes`)"


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_shipped_recipe_loads_by_name(path: Path):
    assert load_recipe(recipe_id(path)) == load_recipe(path)


def test_every_recipe_file_is_listed():
    assert list_recipes() == [recipe_id(p) for p in RECIPES]
