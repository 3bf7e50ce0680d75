"""Recipe errors that name the key, the value received, what is allowed and the fix.

Every problem in a recipe becomes one ``RecipeIssue`` (a key path such as ``optim.lr`` or ``objective.w_min``);
validation collects all of them and raises a single ``RecipeError`` that prints them together.

Cross-field checks inside a pydantic validator report through ``issue(...)`` + ``raise_issues(...)`` so the
key path points at the offending key rather than at its block.

pydantic is imported by the functions that read its errors, not here: ``RecipeError`` alone (``fewstep recipes``)
stays cheap to import.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]

ISSUES_ERROR_TYPE = "fewstep_issues"
MAX_LISTED_ISSUES = 50  # a message lists this many problems, then says how many more


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""Marks an issue that has no received value (a missing key, a file-level problem)."""


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe.

    Attributes:
        loc: key path inside the recipe, e.g. ``("optim", "lr")`` or ``("train", "sample_steps", 1)``;
            empty for problems with the whole file.
        message: what is wrong, e.g. ``"unknown key"`` or ``"should be greater than 0"``.
        value: the value received (``MISSING`` when there is none).
        allowed: what would be accepted (choices, allowed keys or a type).
        hint: the fix, e.g. ``"Did you mean 'rank'?"``.
    """

    loc: Loc
    message: str
    value: Any = MISSING
    allowed: str | None = None
    hint: str | None = None

    @property
    def path(self) -> str:
        return format_loc(self.loc)

    def __str__(self) -> str:
        message = self.message.rstrip(".")
        text = f"{self.path}: {message}" if self.loc else message
        if self.value is not MISSING:
            text += f"; got {short_repr(self.value)}"
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        if self.hint:
            text += f" {self.hint}" if self.hint.startswith("(") else f". {self.hint}"
        return text


class RecipeError(Exception):
    """A recipe (or a recipe file, or a command-line override) is invalid. Holds every problem found.

    Args:
        issues: the problems, or one message for a file-level problem.
        source: the file or recipe name the problems belong to.
        kind: what ``source`` is, for the message ("recipe"; "accelerate config" for a launch config).
    """

    def __init__(self, issues: Sequence[RecipeIssue] | str, source: str | None = None, kind: str = "recipe") -> None:
        if isinstance(issues, str):
            issues = [RecipeIssue((), issues)]
        self.issues: list[RecipeIssue] = list(issues)
        self.source = source
        self.kind = kind
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" in {self.kind} {self.source}" if self.source else f" in {self.kind}"
        if len(self.issues) == 1 and not self.issues[0].loc:
            return f"{self.issues[0]}{f' ({self.source})' if self.source else ''}"
        count = len(self.issues)
        head = f"{count} error{'s' if count != 1 else ''}{where}:"
        more = [f"  ... and {count - MAX_LISTED_ISSUES} more"] if count > MAX_LISTED_ISSUES else []
        return "\n".join([head, *(f"  - {issue}" for issue in self.issues[:MAX_LISTED_ISSUES]), *more])

    def with_source(self, source: str) -> RecipeError:
        return RecipeError(self.issues, source=source, kind=self.kind)


class RunFailedError(RuntimeError):
    """A run that started and could not go on (e.g. training stopped after too many non-finite steps): ``fewstep``
    prints the message and exits with status 1, without a traceback."""

    exit_status = 1


def format_loc(loc: Loc) -> str:
    """``("train", "sample_steps", 1)`` → ``train.sample_steps[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _Full(Exception):
    pass


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, built only as far as the cut: a value that stands for millions of
    items (a list repeated through YAML aliases) costs ``limit`` characters, not its full repr."""
    parts: list[str] = []
    room = [limit + 1]

    def emit(text: str) -> None:
        parts.append(text[: room[0]])
        room[0] -= len(text)
        if room[0] <= 0:
            raise _Full

    def walk(item: Any) -> None:
        if isinstance(item, dict) and type(item).__repr__ is dict.__repr__:
            emit("{")
            for i, (key, val) in enumerate(item.items()):
                emit(", " if i else "")
                walk(key)
                emit(": ")
                walk(val)
            emit("}")
        elif isinstance(item, list | tuple) and type(item).__repr__ in (list.__repr__, tuple.__repr__):
            open_, close = ("[", "]") if isinstance(item, list) else ("(", ",)" if len(item) == 1 else ")")
            emit(open_)
            for i, val in enumerate(item):
                emit(", " if i else "")
                walk(val)
            emit(close)
        elif isinstance(item, str | bytes) and len(item) > limit:
            emit(repr(item[: limit + 1]))
        else:
            emit(repr(item))

    try:
        walk(value)
    except _Full:
        pass
    except RecursionError:
        parts.append("...")
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(name: object, allowed: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(str(name), list(allowed), n=1, cutoff=0.6)
    return f"Did you mean {close[0]!r}?" if close else None


def issue(
    key: str | Loc, message: str, value: Any = MISSING, allowed: str | None = None, hint: str | None = None
) -> RecipeIssue:
    """An issue at ``key`` relative to the block being validated (for use inside pydantic validators)."""
    loc = tuple(key.split(".")) if isinstance(key, str) else tuple(key)
    return RecipeIssue(loc, message, value, allowed, hint)


def raise_issues(issues: Sequence[RecipeIssue]) -> None:
    """Raise ``issues`` (relative to the current block) from inside a pydantic validator; no-op when empty.

    ``issues_from_validation`` unpacks them with the block's key path in front, so ``Recipe.model_validate``
    still reports every problem and ``RecipeError`` names the exact key.
    """
    if issues:
        from pydantic_core import PydanticCustomError

        summary = "; ".join(str(i) for i in issues)
        raise PydanticCustomError(ISSUES_ERROR_TYPE, "{summary}", {"summary": summary, "issues": list(issues)})


def issues_from_validation(err: ValidationError, model: type[BaseModel]) -> list[RecipeIssue]:
    """Turn a pydantic ``ValidationError`` raised by ``model`` into issues with key paths, values and choices."""
    issues: list[RecipeIssue] = []
    for error in err.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        if error["type"] == ISSUES_ERROR_TYPE:
            issues.extend(replace(sub, loc=loc + sub.loc) for sub in ctx["issues"])
        else:
            issues.append(_issue_from_error(error, loc, model))
    return issues


def _issue_from_error(error: dict[str, Any], loc: Loc, model: type[BaseModel]) -> RecipeIssue:
    kind, value = error["type"], error.get("input", MISSING)
    if kind == "extra_forbidden":
        block = _annotation_at(model, loc[:-1])
        keys = sorted(_model_class(block).model_fields) if _model_class(block) else []
        return RecipeIssue(
            loc,
            "unknown key",
            value,
            ", ".join(keys),
            did_you_mean(loc[-1], keys) or "Remove it or check the spelling.",
        )
    annotation = _annotation_at(model, loc)
    allowed = describe(annotation) if annotation is not None else None
    if kind == "missing":
        what = "value is missing (the list is too short)" if loc and isinstance(loc[-1], int) else "key is missing"
        return RecipeIssue(loc, f"required {what}", MISSING, allowed)
    message = error["msg"].replace("Value error, ", "").replace(" after validation", "").rstrip(".")
    message = message[:1].lower() + message[1:]  # "Input should be ..." → "input should be ..."
    message = message.removeprefix("input ")
    if kind == "literal_error":
        return RecipeIssue(loc, "not an allowed value", value, allowed)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return RecipeIssue(loc, "should be a block (a mapping of keys to values)", value, allowed)
    if kind.endswith(("_type", "_parsing")):
        return RecipeIssue(loc, message, value, allowed)
    if kind in ("value_error", "assertion_error") and _model_class(annotation):
        return RecipeIssue(loc, message)  # a block-level check: its message names the keys involved
    return RecipeIssue(loc, message, value)  # a constraint (> 0, at least one item, ...): the message says it


def describe(annotation: Any) -> str:
    """Human words for a type: ``Literal['a','b']`` → ``'a', 'b'``; ``int | None`` → ``an integer or null``."""
    from pydantic import BaseModel

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return describe(args[0])
    if origin is Literal:
        return ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_PLURAL.get(describe(args[0]), 'values')}"
        return f"a list of {_PLURAL.get(describe(args[0]), 'values') if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_PLURAL.get(describe(args[0]), 'keys')} to {_PLURAL.get(describe(args[1]), 'values')}"
    if annotation is BaseModel:
        return "a block"
    if _model_class(annotation):
        return f"a block with keys {', '.join(sorted(annotation.model_fields))}"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


_TYPE_WORDS: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    type(None): "null",
    Any: "any value",
}


_PLURAL = {"an integer": "integers", "a number": "numbers", "a string": "strings", "true or false": "booleans"}


def _model_class(annotation: Any) -> type[BaseModel] | None:
    from pydantic import BaseModel

    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not BaseModel:
        return annotation
    return None


def _strip_optional(annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _strip_optional(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _strip_optional(rest[0])
    return annotation


def _annotation_at(model: type[BaseModel], loc: Loc) -> Any:
    """The declared type at ``loc`` below ``model`` (None when it cannot be followed)."""
    annotation: Any = model
    for part in loc:
        annotation = _strip_optional(annotation)
        block = _model_class(annotation)
        if block is not None:
            field = block.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
            continue
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is list and args:
            annotation = args[0]
        elif origin is tuple and args:
            annotation = args[0] if args[-1] is Ellipsis else args[min(int(part), len(args) - 1)]
        elif origin is dict and args:
            annotation = args[1]
        else:
            return None
    return annotation
