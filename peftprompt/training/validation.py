"""The typed configuration layer under `TrainConfig` and the recipes' data sections: a pydantic base model, the
field types they share, and the translation of pydantic's errors into one-line `FieldError` messages.

Why pydantic v2 (already installed through the dependency tree, 2.14 here): field-level validation whose errors
carry the location of the bad value (so a message can name ``data.max_depth``, and `load_config` can add its
``file:line``), a JSON schema of every model (``TrainConfig.model_json_schema()``), typed sub-models for the data
sections, and plain classes with no code generation.

A `ConfigModel` never lets pydantic's multi-line ``ValidationError`` out: its first error (unknown keys first, then
in the order the keys were given) becomes a `FieldError` naming the field path and the constraint, in the wording
of the rest of the project::

    field 'max_steps' must be >= 1, got 0
    field 'learning_rate' expects float, got 'abc'
    field 'data.mode' must be one of flat, recursive, mix, got 'deep'
    unknown key 'data.max_dpeth' (did you mean 'data.max_depth'?)

Numbers are lenient as YAML needs them to be: an int is fine for a float field, and a string such as ``"1e-4"``
(YAML 1.1, which PyYAML implements, reads ``1e-4`` without a dot as a string) for a float field or ``"1e4"`` for an
int field; a bool is never a number and only true / false are bools (pydantic's lax mode would read ``yes`` or
``1`` as true).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, StringConstraints, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from ..errors import InputError


class FieldError(InputError):
    """A field's value is wrong; `field` is its dotted path (``data.max_depth``). The message has no location yet:
    `load_config` adds the ``file:line`` of the YAML key or the override that set it."""


class UnknownKeyError(FieldError):
    """A key that is no field; `hint` is `" (did you mean 'x'?)"`, the model's `ConfigModel.known_keys` or empty.
    An override names the key itself, so `load_config` words it ``override 'learnin_rate=1': unknown key (did you
    mean 'learning_rate'?)``."""

    def __init__(self, message: str, *, field: str, hint: str):
        super().__init__(message, field=field)
        self.hint = hint


def _number(value: Any) -> Any:
    """Before an int or float field: a bool is refused, and a string holding an integral number in any notation
    (``"1e4"``) is that int."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "a bool is not a number")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if number.is_integer():
            return int(number)
    return value


def _one_or_list(value: Any) -> Any:
    """Before a list-of-names field that also takes one name: ``metrics: accuracy`` means ``[accuracy]``."""
    return [value] if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = StrictBool
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
"""A name or a path: a non-blank string, surrounding blanks dropped."""
Names = Annotated[list[Name], BeforeValidator(_one_or_list)]
"""A list of names, where one name is a list of one."""


def one_of(choices: Iterable[Any]) -> Any:
    """The type of a field that takes one of `choices`: a ``Literal``, so the JSON schema lists them too."""
    return Literal[tuple(choices)]


class ConfigModel(BaseModel):
    """A pydantic model whose validation errors are `FieldError` exceptions: unknown keys are refused (with the
    closest field as a hint), floats must be finite. `field_prefix` is where the model sits in a config
    (``"data"`` for a data section), so its errors name ``data.<field>``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    field_prefix: ClassVar[str] = ""

    @classmethod
    def known_keys(cls) -> str:
        """What an unknown key's message says when no field is close to it (``""``: nothing)."""
        return ""

    def __init__(self, /, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise field_error(err, type(self), list(values)) from None


def suggest(word: Any, candidates: Iterable[Any], prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` for the candidate closest to `word` (named ``prefix.x`` with a `prefix`), or
    ``""`` when none is close."""
    close = difflib.get_close_matches(_shown(word), [_shown(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {'.'.join(filter(None, (prefix, close[0])))!r}?)" if close else ""


def field_error(err: ValidationError, model: type[ConfigModel], order: Sequence[str] = ()) -> FieldError:
    """The first error of `err` (raised validating `model` from keys given in `order`) as a `FieldError`.

    Unknown keys come first (a misspelt key also leaves its field at the default), then the keys in `order`.
    """

    def rank(error: dict) -> tuple[bool, int]:
        key = error["loc"][0] if error["loc"] else None
        return error["type"] != "extra_forbidden", order.index(key) if key in order else len(order)

    return _translate(min(err.errors(), key=rank), model)


def _translate(error: dict, model: type[ConfigModel]) -> FieldError:
    loc, kind, value = error["loc"], error["type"], error.get("input")
    prefix = model.field_prefix
    path = ".".join(str(part) for part in (prefix, *loc) if part != "")
    if kind in ("value_error", "assertion_error"):
        cause = error["ctx"]["error"]
        if isinstance(cause, FieldError):  # a nested model's own error, already worded
            return cause
        if not loc:  # a model validator's: fields that do not go together
            return FieldError(
                getattr(cause, "message", str(cause)), field=getattr(cause, "field", None) or prefix or None
            )
        return FieldError(f"field {path!r}: {cause}", field=path)
    if kind == "extra_forbidden":
        hint = suggest(loc[-1], model.model_fields, prefix) or model.known_keys()
        return UnknownKeyError(f"unknown key {path!r}{hint}", field=path, hint=hint)
    annotation, metadata = _field_type(model, loc)
    if kind == "missing":
        return FieldError(f"field {path!r} is required ({_expected(annotation, metadata)})", field=path)
    if kind == "literal_error":
        choices = _choices(annotation)
        return FieldError(
            f"field {path!r} must be one of {', '.join(map(_shown, choices))}, got {_value(value)}"
            f"{suggest(value, choices)}",
            field=path,
        )
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return FieldError(f"field {path!r} must be {_bounds(metadata)}, got {_value(value)}", field=path)
    return FieldError(f"field {path!r} expects {_expected(annotation, metadata)}, got {_value(value)}", field=path)


def _field_type(model: type[BaseModel], loc: tuple) -> tuple[Any, list]:
    """The type and the constraints of the value at `loc` in `model` (a field, or an item of a list field)."""
    if not loc or loc[0] not in model.model_fields:
        return None, []
    info: FieldInfo = model.model_fields[loc[0]]
    annotation, metadata = info.annotation, list(info.metadata)
    for part in loc[1:]:
        inner, _, _ = _strip(annotation)
        if not isinstance(part, int) or get_origin(inner) is not list:
            break
        annotation, metadata = get_args(inner)[0], []
    return annotation, [*_flat(metadata), *_strip(annotation)[1]]


def _strip(annotation: Any) -> tuple[Any, list, bool]:
    """`annotation` without ``Annotated`` (its constraints returned, flattened) and ``Optional`` (whether it was)."""
    metadata: list = []
    optional = False
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            metadata += more
        elif get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
            rest = tuple(a for a in get_args(annotation) if a is not type(None))
            # a type built here, not an annotation written
            annotation, optional = (rest[0] if len(rest) == 1 else Union[rest]), True  # noqa: UP007
        else:
            return annotation, _flat(metadata), optional


def _flat(metadata: Iterable[Any]) -> list:
    flat = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            flat += _flat(item.metadata)
        elif isinstance(item, GroupedMetadata):
            flat += _flat(item)
        else:
            flat.append(item)
    return flat


def _expected(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a field takes, in words: ``int or null``, ``a non-empty list of strings``, ``one of a, b``."""
    annotation, more, optional = _strip(annotation)
    metadata = [*_flat(metadata), *more]
    origin = get_origin(annotation)
    if origin is Literal:
        text = f"one of {', '.join(map(_shown, get_args(annotation)))}"
    elif origin is list:
        item, _, _ = _strip(get_args(annotation)[0])
        items = {str: "strings", int: "ints", float: "numbers"}.get(item)
        if get_origin(item) is Literal:
            items = f"names from {', '.join(map(_shown, get_args(item)))}"
        low = next((m.min_length for m in metadata if isinstance(m, MinLen)), 0)
        high = next((m.max_length for m in metadata if isinstance(m, MaxLen)), None)
        text = f"a list of {low} {items}" if low == high else f"a {'non-empty ' if low else ''}list of {items}"
    elif origin in (Union, types.UnionType):
        text = " or ".join(dict.fromkeys(_expected(a) for a in get_args(annotation)))
    elif annotation is dict or origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        text = "a mapping"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return f"{text} or null" if optional else text


def _choices(annotation: Any) -> tuple:
    annotation, _, _ = _strip(annotation)
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _bounds(metadata: Sequence[Any]) -> str:
    """A field's range in words: ``>= 1``, ``> 0``, ``in [0, 1)``."""
    lower = next(
        ((">=", m.ge) if isinstance(m, Ge) else (">", m.gt) for m in metadata if isinstance(m, (Ge, Gt))), None
    )
    upper = next(
        (("<=", m.le) if isinstance(m, Le) else ("<", m.lt) for m in metadata if isinstance(m, (Le, Lt))), None
    )
    if lower and upper:
        return f"in {'[' if lower[0] == '>=' else '('}{lower[1]}, {upper[1]}{']' if upper[0] == '<=' else ')'}"
    sign, bound = lower or upper
    return f"{sign} {bound}"


def _shown(value: Any) -> str:
    """A choice as YAML writes it (``true``, ``null``), anything else as text."""
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _value(value: Any) -> str:
    """The value a message quotes: its repr, ``null`` for None."""
    return "null" if value is None else repr(value)
