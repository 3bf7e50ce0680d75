"""Recipes: the strict schema, YAML loading with ``key=value`` overrides, and errors that list every problem."""

from fewstep.config.errors import RecipeError, RecipeIssue
from fewstep.config.load import (
    apply_overrides,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_description,
    recipes_dir,
    resolve_recipe,
    validate_recipe,
)
from fewstep.config.schema import (
    DataConfig,
    EvalConfig,
    ExportConfig,
    LoraBlock,
    OptimConfig,
    Recipe,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "LoraBlock",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RecipeIssue",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_description",
    "recipes_dir",
    "resolve_recipe",
    "validate_recipe",
]
