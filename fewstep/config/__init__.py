"""Recipes: the strict schema, YAML loading with ``key=value`` overrides, and errors that list every problem.

Names are imported on first use: listing and reading recipes (``fewstep recipes``) needs neither pydantic nor the
schema, and only validation imports the objectives (whose configs need torch).
"""

import importlib

_EXPORTS = {
    "RecipeError": "fewstep.config.errors",
    "RecipeIssue": "fewstep.config.errors",
    **dict.fromkeys(
        (
            "apply_overrides",
            "dump_recipe",
            "list_recipes",
            "load_recipe",
            "recipe_description",
            "recipes_dir",
            "resolve_recipe",
            "validate_recipe",
        ),
        "fewstep.config.load",
    ),
    **dict.fromkeys(
        (
            "DataConfig",
            "EvalConfig",
            "ExportConfig",
            "LoraBlock",
            "OptimConfig",
            "Recipe",
            "StudentConfig",
            "TeacherConfig",
            "TrainConfig",
        ),
        "fewstep.config.schema",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fewstep.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
