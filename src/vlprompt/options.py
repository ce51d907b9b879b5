"""One validator for options dataclasses, driven by their field annotations.

Configs declare a field's type once (``n_ctx: int``) and its range once (``n_ctx: int = opt(16, min=0)``);
:func:`check_options` then refuses a wrong value with a one-line message naming every bad option, instead of a
``TypeError`` traceback far from its cause (``"abc" >= 0``). :func:`parse_scalar` is how ``--set key=value`` text
becomes a value.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from typing import Any, ClassVar, Literal, Union

import yaml

__all__ = ["OptionError", "check_keys", "check_options", "describe_type", "opt", "parse_scalar", "yaml_problem"]

HINT = "write numbers unquoted (lr: 0.001 or lr: 1e-3), booleans as true/false"
RANGE_KEYS = ("min", "max", "gt")

# Names a user reads in a message: they write YAML, not Python, so "true or false" rather than "bool".
_SIMPLE_NAMES: dict[Any, tuple[str, str]] = {  # annotation -> (singular, plural)
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "true/false values"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
    Any: ("anything", "values"),
}


class OptionError(ValueError):
    """Options of the wrong type or out of range; the message lists all of them on one line."""

    def __init__(self, problems: list[str], hint: bool | str = True) -> None:
        self.problems = list(problems)
        message = "invalid options: " + "; ".join(self.problems)
        hint_text = HINT if hint is True else (hint or "")
        super().__init__(message + (f" - {hint_text}" if hint_text else ""))


BOOLEAN_WORDS_HINT = "quote it: YAML reads on/off/yes/no as true/false"


def _wrong_type_hint(value: Any, annotation: Any) -> str | None:
    """The advice for a value of the wrong type, only where it applies: a quoted number or boolean (the general
    hint), a word YAML turned into a boolean where text was expected, or a non-finite number."""
    if isinstance(value, bool):
        return BOOLEAN_WORDS_HINT if "string" in describe_type(annotation) else None
    if isinstance(value, str):
        if value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
            return "give a finite number"
        try:
            parsed = parse_scalar(value)
        except OptionError:
            return None
        if isinstance(parsed, (int, float, bool)):
            return HINT
    return None


class _Refused(Exception):
    """Internal: a value does not fit an annotation (kept apart from errors raised by the checks themselves)."""


# ------------------------------------------------------------------------------------------ field declaration
def opt(
    default: Any,
    *,
    min: float | None = None,  # noqa: A002 - the metadata key the configs read as a word
    max: float | None = None,  # noqa: A002
    gt: float | None = None,
    help: str = "",  # noqa: A002
    tower: str | None = None,
    placeholder: bool = False,
    **kw: Any,
) -> Any:
    """A dataclass field whose range (and help text) :func:`check_options` and the CLI read from its metadata.

    ``tower`` ("text", "image" or "both") marks a prompt depth: at most that tower's layer count on the backbone
    at hand, and ``"all"`` means every layer (resolved by the method registry). ``placeholder`` marks a sentence
    that needs exactly one ``{}`` for the class name.
    A list, dict or set default becomes a ``default_factory`` that copies it, so instances never share it.
    """
    metadata: dict[str, Any] = dict(kw.pop("metadata", None) or {})
    bounds = {"min": min, "max": max, "gt": gt}
    metadata.update({key: bound for key, bound in bounds.items() if bound is not None})
    if help:
        metadata["help"] = help
    if tower is not None:
        if tower not in ("text", "image", "both"):
            raise ValueError(f"tower must be 'text', 'image' or 'both', got {tower!r}")
        metadata["tower"] = tower
    if placeholder:
        metadata["placeholder"] = True
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


# ------------------------------------------------------------------------------------------ readable types
def describe_type(annotation: Any) -> str:
    """The type as a user reads it in a message or in CLI help: ``an integer or 'all'``, ``a list of numbers``."""
    simple = _simple_names(annotation)
    if simple is not None:
        return simple[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _describe_choices(args)
    if _is_union(annotation):
        return _join_or([describe_type(arm) for arm in _union_arms(args)])
    if origin in (list, tuple) or annotation in (list, tuple):
        return _describe_sequence(annotation)
    if origin is dict or annotation is dict:
        return _describe_mapping(args)
    name = getattr(annotation, "__name__", str(annotation))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _simple_names(annotation: Any) -> tuple[str, str] | None:
    if annotation is None:  # typing spells NoneType as None inside annotations
        annotation = type(None)
    try:
        return _SIMPLE_NAMES.get(annotation)
    except TypeError:  # an unhashable annotation (a Literal of lists, say) is no simple type
        return None


def _plural(annotation: Any) -> str:
    simple = _simple_names(annotation)
    if simple is not None:
        return simple[1]
    described = describe_type(annotation)
    for article in ("a ", "an "):  # "a list of numbers" -> "lists of numbers", "a mapping" -> "mappings"
        if described.startswith(article) and " or " not in described:
            head, of, tail = described[len(article):].partition(" of ")
            return f"{head}s{of}{tail}"
    return f"items that are each {described}"


def _describe_choices(choices: tuple[Any, ...]) -> str:
    shown = ", ".join(_show_choice(choice) for choice in choices)
    return shown if len(choices) == 1 else f"one of {shown}"


def _show_choice(choice: Any) -> str:
    # YAML spellings, since that is what the user types: true rather than True, null rather than None.
    if choice is None:
        return "null"
    if isinstance(choice, bool):
        return "true" if choice else "false"
    return repr(choice)


def _join_or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _describe_sequence(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if not args or (len(args) == 2 and args[1] is Ellipsis and args[0] is Any) or args == (Any,):
        return "a list"
    if typing.get_origin(annotation) is list or args[-1] is Ellipsis:
        return f"a list of {_plural(args[0])}"
    return f"a list of {len(args)} items ({', '.join(describe_type(arg) for arg in args)})"


def _describe_mapping(args: tuple[Any, ...]) -> str:
    if not args or args == (str, Any) or args == (Any, Any):
        return "a mapping"
    return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _union_arms(args: tuple[Any, ...]) -> list[Any]:
    # None last, so "X | None" reads "X or null" whichever order it was written in.
    return [arm for arm in args if arm is not type(None)] + [arm for arm in args if arm is type(None)]


# ------------------------------------------------------------------------------------------ type checks
def _convert(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` wants it (converted only where lossless), or :class:`_Refused`."""
    if annotation is Any or annotation is object:
        return value
    if annotation is type(None) or annotation is None:
        return _require(value, value is None)
    if annotation is bool:
        return _require(value, isinstance(value, bool))
    if annotation is int:
        # bool is an int to Python but a slip in a config; 4.0 could be a typo for 4.5, so it is refused too.
        return _require(value, isinstance(value, int) and not isinstance(value, bool))
    if annotation is float:
        return _to_float(value)
    if annotation is str:
        return _require(value, isinstance(value, str))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _require(value, any(type(value) is type(choice) and value == choice for choice in args))
    if _is_union(annotation):
        return _convert_union(value, args)
    if origin is list or annotation is list:
        return _convert_items(value, args, list)
    if origin is tuple or annotation is tuple:
        return _convert_tuple(value, args)
    if origin is dict or annotation is dict:
        return _convert_mapping(value, args)
    if isinstance(annotation, type):
        return _require(value, isinstance(value, annotation))
    return value  # an annotation this module does not model (a TypeVar, a Protocol, ...): trust it


def _require(value: Any, ok: bool) -> Any:
    if not ok:
        raise _Refused
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused
    try:
        return float(value)
    except OverflowError:  # an int beyond float range cannot become a float without loss
        raise _Refused from None


def _convert_union(value: Any, arms: tuple[Any, ...]) -> Any:
    # An arm that takes the value as it is wins over one that would convert it (int | float keeps 3 an int).
    converted = []
    for arm in arms:
        try:
            result = _convert(value, arm)
        except _Refused:
            continue
        if result is value:
            return value
        converted.append(result)
    if not converted:
        raise _Refused
    return converted[0]


def _convert_items(value: Any, args: tuple[Any, ...], kind: type) -> Any:
    # YAML writes every sequence as a list, and Python callers may pass tuples: both are accepted.
    if not isinstance(value, (list, tuple)):
        raise _Refused
    item_type = args[0] if args else Any
    items = [_convert(item, item_type) for item in value]
    # The caller's own list is kept when nothing changed, so checking never swaps an object behind its back.
    if type(value) is kind and all(new is old for new, old in zip(items, value)):
        return value
    return kind(items)


def _convert_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        return _convert_items(value, args[:1], tuple)
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise _Refused
    return tuple(_convert(item, arg) for item, arg in zip(value, args))


def _convert_mapping(value: Any, args: tuple[Any, ...]) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _Refused
    key_type, value_type = args if args else (Any, Any)
    pairs = [(_convert(key, key_type), _convert(item, value_type)) for key, item in value.items()]
    if all(new_key is key and new_item is item for (new_key, new_item), (key, item) in zip(pairs, value.items())):
        return value
    return dict(pairs)


# ------------------------------------------------------------------------------------------ range checks
def _range_problem(value: Any, metadata: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with a number (or with the numbers of a list) given the field's min/max/gt, or None."""
    bounds = {key: metadata[key] for key in RANGE_KEYS if metadata.get(key) is not None}
    if not bounds:
        return None
    if isinstance(value, (list, tuple)):
        problems = [problem for item in value if (problem := _bound_problem(item, bounds)) is not None]
        return f"each item {problems[0]}" if problems else None
    return _bound_problem(value, bounds)


def _bound_problem(value: Any, bounds: dict[str, Any]) -> str | None:
    # Ranges concern numbers only: None and string choices such as "all" have no size to compare.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and value != value:  # nan: no bound can hold, and "must be > 0" would mislead
        return "must be a number, not nan"
    # Written as "not (ok)" so that nan, which compares false to everything, fails every bound.
    if "gt" in bounds and not value > bounds["gt"]:
        return f"must be > {bounds['gt']}"
    if "min" in bounds and not value >= bounds["min"]:
        return f"must be >= {bounds['min']}"
    if "max" in bounds and not value <= bounds["max"]:
        return f"must be <= {bounds['max']}"
    return None


# ------------------------------------------------------------------------------------------ the validator
def check_options(obj: Any, prefix: str = "") -> None:
    """Check every field of the dataclass instance `obj` against its annotation and declared range.

    Lossless conversions are written back (an int in a float field becomes a float, a tuple in a list field a
    list). Raises one :class:`OptionError` naming every wrong option, each as ``<prefix><name>=<value>``, with a
    hint on writing numbers and booleans when a type is wrong. Fields whose metadata has ``"check": False`` are
    left alone.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"check_options expects a dataclass instance, got {type(obj).__name__}")
    hints = typing.get_type_hints(type(obj))
    problems: list[str] = []
    hints_given: list[str] = []
    for field in dataclasses.fields(obj):
        annotation = hints.get(field.name, Any)
        if typing.get_origin(annotation) is ClassVar or field.metadata.get("check", True) is False:
            continue
        value = getattr(obj, field.name)
        shown = f"{prefix}{field.name}={value!r}"
        try:
            converted = _convert(value, annotation)
        except _Refused:
            problems.append(f"{shown} (expected {describe_type(annotation)})")
            hint = _wrong_type_hint(value, annotation)
            if hint and hint not in hints_given:
                hints_given.append(hint)
            continue
        if converted is not value:
            _write_back(obj, field.name, converted)
        problem = _range_problem(converted, field.metadata)
        if problem is None and field.metadata.get("placeholder") and isinstance(converted, str):
            if converted.count("{}") != 1:
                problem = "needs exactly one '{}' where the class name goes"
        if problem is not None:
            problems.append(f"{shown} ({problem})")
    if problems:
        # Advice only where it applies: a number out of range or a list for a number was written as meant.
        raise OptionError(problems, hint="; ".join(hints_given))


def _write_back(obj: Any, name: str, value: Any) -> None:
    # A frozen dataclass refuses setattr; converting in __post_init__ is still what its author wants.
    if obj.__dataclass_params__.frozen:
        object.__setattr__(obj, name, value)
    else:
        setattr(obj, name, value)


# ------------------------------------------------------------------------------------------ --set values
class _ValueLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot, or no sign in the exponent) as a string; configs write learning rates that
    way, so such text reads as a float, as YAML 1.2 and Python read it."""


_ValueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """The value of ``--set key=value`` text, read as YAML: ``0.5``, ``1e-3``, ``true``, ``[1, 2]``, ``abc``.

    ``null``, ``~``, an empty text and ``none`` (any case) give None. Raises :class:`OptionError` on text that
    is not valid YAML.
    """
    if text.strip().lower() == "none":  # Python users write None; YAML would read it as the string "None"
        return None
    try:
        return yaml.load(text, Loader=_ValueLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise OptionError([f"{text!r} is not a valid value ({problem})"], hint=False) from err



def check_keys(values: typing.Mapping[str, Any], options_class: type, what: str) -> None:
    """Refuse keys that are not fields of the dataclass ``options_class``, naming the closest field and all of them
    (``what``: e.g. "train option", "data option")."""
    import difflib

    known = [field.name for field in dataclasses.fields(options_class) if field.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        maybe = f" (did you mean {close[0]}?)" if close else ""
        raise OptionError([f"unknown {what}(s) {unknown}{maybe}; the options are: {', '.join(known)}"], hint=False)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where it is (line and column, 1-based) and what the parser found."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
