"""Load recipes from YAML (a path or a shipped name), apply ``a.b.c=value`` overrides, validate, dump.

YAML is read with YAML 1.2 scalar rules: only ``true``/``false`` are booleans (so ``mixed_precision: no`` stays the
string ``"no"``) and ``1e-4`` is a number. Duplicate keys are an error rather than a silent last-one-wins. A document
nested deeper than ``MAX_YAML_DEPTH`` blocks and lists, or whose anchors and aliases (``&a`` / ``*a``) expand to more
than ``MAX_YAML_VALUES`` values, is refused before anything is built from it (a few hundred bytes of aliases can
otherwise stand for billions of values).
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fewstep.config.errors import (
    MISSING,
    RecipeError,
    RecipeIssue,
    did_you_mean,
    format_loc,
    issues_from_validation,
    short_repr,
)

if TYPE_CHECKING:
    from fewstep.config.schema import Recipe

RECIPE_SUFFIX = ".yaml"
LAUNCH_CONFIG_DIR = "accelerate"  # <recipes>/accelerate/ holds accelerate launch configs, not recipes
MAX_YAML_DEPTH = 64  # nested blocks and lists; a recipe needs about 5
MAX_YAML_VALUES = 100_000  # values (keys, scalars, blocks, lists) with every alias expanded


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats, an error on duplicate keys, and the depth and size limits."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                message = f"nested deeper than {MAX_YAML_DEPTH} levels of blocks and lists; a recipe needs about 5"
                raise yaml.composer.ComposerError(None, None, message, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_values(node, {}) > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None,
                f"holds more than {MAX_YAML_VALUES:,} values once its anchors and aliases (&name / *name) are "
                "expanded; a recipe needs a few hundred. Remove the repeated aliases (long prompt lists belong in a "
                "file: data.path)",
                node.start_mark,
            )  # fmt: skip
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per block)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YAML11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")  # yes/no/on/off booleans, floats needing a dot
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _expanded_values(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias expanded, counted once per distinct node (an alias is
    the same node object), stopping early past the limit. Depth is bounded by ``MAX_YAML_DEPTH``."""
    if id(node) in memo:
        return memo[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_values(child, memo)
        if total > MAX_YAML_VALUES:
            break
    memo[id(node)] = total
    return total


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the recipe rules; syntax errors become a ``RecipeError`` naming ``source``."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise RecipeError(f"{where}: invalid YAML: {detail}") from None


def recipes_dir() -> Path:
    """The shipped recipes: ``fewstep/recipes`` (package data), else ``<repo>/recipes`` in a source checkout."""
    packaged = importlib.resources.files("fewstep") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the recipes under ``root`` (default: the shipped ones), e.g. ``["lcm/sd15_lcm_lora", ...]``; the
    accelerate configs in its ``accelerate/`` folder are not recipes and are left out."""
    base = Path(root) if root is not None else recipes_dir()
    if not base.is_dir():
        return []
    names = (p.relative_to(base).with_suffix("").as_posix() for p in base.rglob(f"*{RECIPE_SUFFIX}"))
    return sorted(name for name in names if name.split("/")[0] != LAUNCH_CONFIG_DIR)


def resolve_recipe(path_or_name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """A recipe file path from a path (tried first) or a shipped name such as ``quickstart/digits_lcm``."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"recipe {str(path)!r} is a directory; give a .yaml file or a recipe name")
    base = Path(root) if root is not None else recipes_dir()
    name = str(path_or_name).removesuffix(RECIPE_SUFFIX)
    shipped = base / f"{name}{RECIPE_SUFFIX}"
    if shipped.is_file():
        return shipped
    names = list_recipes(base)
    hint = did_you_mean(name, names) or "Give a path to a .yaml file, or run `fewstep recipes` to list names."
    listing = f" Shipped recipes: {', '.join(names)}." if names else f" No shipped recipes were found in {base}."
    raise RecipeError(
        f"recipe {str(path_or_name)!r} not found: no such file and no shipped recipe of that name. {hint}{listing}"
    )


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping in a recipe file (not validated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"recipe file {str(path)!r} is not UTF-8 text (byte {err.start}): a recipe is a YAML file"
        ) from None
    data = parse_yaml(text, source=str(path))
    if data is None:
        raise RecipeError(
            f"recipe file {str(path)!r} is empty; a recipe is a mapping with teacher, objective, "
            "data and output_dir blocks"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"recipe file {str(path)!r} holds a {type(data).__name__}, not a mapping of blocks "
            "(teacher:, objective:, data:, ...)"
        )
    return data


def parse_override(override: str) -> tuple[tuple[str, ...], Any]:
    """``"train.sample_steps=[1,2]"`` → ``(("train", "sample_steps"), [1, 2])`` with YAML scalar rules."""
    key, sep, raw = override.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise RecipeError(f"override {short_repr(override)} should look like dotted.key=value, e.g. train.max_steps=2")
    return keys, parse_yaml(raw, source=f"override {short_repr(override)}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``a.b.c=value`` override set (blocks are created as needed).

    A misspelt key is set as given and then rejected by validation with a did-you-mean.
    """
    data = copy.deepcopy(data)
    issues: list[RecipeIssue] = []
    for override in overrides:
        keys, value = parse_override(override)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                issues.append(
                    RecipeIssue(
                        keys[: depth + 1],
                        f"is not a block, so {'.'.join(keys)} cannot be set",
                        child,
                        hint=f"Check the override {short_repr(override)}.",
                    )
                )
                break
            node = child
        else:
            node[keys[-1]] = value
    if issues:
        raise RecipeError(issues)
    return data


def validate_recipe(data: Any, source: str | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Validate a raw mapping into a ``Recipe``; every problem is collected into one ``RecipeError``. The checks
    across blocks (``fewstep.config.checks.recipe_issues``) run once the blocks themselves are valid."""
    from pydantic import ValidationError

    from fewstep.config.schema import Recipe  # lazy: listing and reading recipes needs neither pydantic nor schema

    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of blocks, not a {type(data).__name__}", source=source)
    from fewstep.config.checks import recipe_issues

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        issues = [_name_objectives(i) for i in issues_from_validation(err, Recipe)]
    else:
        issues = recipe_issues(recipe)
        if not issues:
            return recipe
    raise RecipeError([_mention_override(i, overrides) for i in issues], source=source)


def _name_objectives(issue: RecipeIssue) -> RecipeIssue:
    if issue.loc == ("objective",) and issue.value is MISSING and issue.message.startswith("required"):
        from fewstep.config.schema import objective_names

        names = ", ".join(repr(n) for n in objective_names())
        return RecipeIssue(
            issue.loc,
            issue.message,
            allowed=f"a block with `name:` one of {names}",
            hint="Add an objective block, e.g. `objective: {name: lcm}`",
        )
    return issue


def _mention_override(issue: RecipeIssue, overrides: Sequence[str]) -> RecipeIssue:
    for override in overrides if issue.loc else ():
        key = override.partition("=")[0].strip()
        if issue.path == key or issue.path.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{issue.path}."):
            hint = f"(set by the override {short_repr(override)})"
            return RecipeIssue(
                issue.loc, issue.message, issue.value, issue.allowed, f"{issue.hint} {hint}" if issue.hint else hint
            )
    return issue


def load_recipe(path_or_name: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path_or_name: a YAML file, or a shipped recipe name such as ``quickstart/digits_lcm``.
        overrides: ``dotted.key=value`` strings; values follow YAML rules (``2``, ``[1,2]``, ``null``, ``tiny:sd15``).

    Returns:
        The validated recipe; ``recipe.objective`` is the objective's own ``Config``.

    Raises:
        RecipeError: the file is missing or not YAML, an override is malformed, or the recipe is invalid
            (every problem with its key path, the value received and what is allowed).
    """
    path = resolve_recipe(path_or_name)
    try:
        data = apply_overrides(read_recipe_file(path), overrides)
    except RecipeError as err:
        if err.source is None and any(i.loc for i in err.issues):
            raise err.with_source(str(path)) from None
        raise
    return validate_recipe(data, source=str(path), overrides=overrides)


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the resolved recipe (every default filled in); ``load_recipe`` reads it back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)


def recipe_description(path: str | os.PathLike[str]) -> str:
    """The ``description:`` of a recipe file without validating it ("" when absent or unreadable)."""
    try:
        data = read_recipe_file(path)
    except RecipeError:
        return ""
    description = data.get("description", "")
    return " ".join(str(description).split()) if description else ""


__all__ = [
    "apply_overrides",
    "dump_recipe",
    "format_loc",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "parse_yaml",
    "recipe_description",
    "recipes_dir",
    "resolve_recipe",
    "read_recipe_file",
    "validate_recipe",
]
