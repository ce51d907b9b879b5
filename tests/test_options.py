"""vlprompt.options: annotation-driven checks of options dataclasses, and how --set text becomes a value."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import pytest

from vlprompt.options import BOOLEAN_WORDS_HINT, OptionError, check_options, describe_type, opt, parse_scalar

HINT = "write numbers unquoted (lr: 0.001 or lr: 1e-3), booleans as true/false"


# String annotations (from __future__) on purpose: the checker must resolve them through get_type_hints.
@dataclass
class Everything:
    n: int = 1
    lr: float = 0.1
    flag: bool = False
    text: str = "x"
    position: Literal["end", "middle", "front"] = "end"
    init: str | None = None
    legacy: Optional[int] = None
    depth: int | Literal["all"] = 1
    sizes: list[float] = field(default_factory=list)
    shape: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (1, "a")
    extra: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    anything: Any = None
    nested: list[list[int]] | None = None


@dataclass
class Ranged:
    n_ctx: int = opt(16, min=0)
    lr: float = opt(0.1, gt=0)
    ratio: float = opt(0.5, min=0, max=1)
    depth: int | Literal["all"] = opt(1, min=1)
    std: float | None = opt(None, gt=0)
    scales: list[float] = opt([1.0], gt=0)


@dataclass
class Skips:
    counter: ClassVar[int] = 0
    free: int = field(default=0, metadata={"check": False})
    checked: int = 0


@dataclass(frozen=True)
class Frozen:
    lr: float = 1


def check(**values: Any) -> Everything:
    obj = Everything(**values)
    check_options(obj)
    return obj


def refusal(obj: Any, prefix: str = "") -> str:
    with pytest.raises(OptionError) as info:
        check_options(obj, prefix)
    return str(info.value)


# ------------------------------------------------------------------------------------------- accepted values
def test_defaults_pass_unchanged():
    obj = check()
    assert obj == Everything()


@pytest.mark.parametrize(
    "values",
    [
        {"n": -3},
        {"lr": 2.5, "flag": True, "text": ""},
        {"position": "front"},
        {"init": "a photo of a", "legacy": 4},
        {"depth": 3},
        {"depth": "all"},
        {"sizes": [0.5, 1.5], "shape": (), "pair": (2, "b")},
        {"extra": {"a": [1], "b": None}, "weights": {"x": 0.5}},
        {"anything": object(), "nested": [[1, 2], []]},
        {"lr": math.nan},
        {"lr": math.inf},
    ],
)
def test_accepts_values_of_the_annotated_type(values):
    obj = check(**values)
    for name, value in values.items():
        got = getattr(obj, name)
        assert got is value or got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))


def test_int_given_to_float_becomes_float():
    obj = check(lr=1, sizes=[1, 2.5], weights={"x": 2})
    assert obj.lr == 1.0 and type(obj.lr) is float
    assert obj.sizes == [1.0, 2.5] and all(type(x) is float for x in obj.sizes)
    assert type(obj.weights["x"]) is float


def test_tuple_given_to_list_becomes_list_and_list_to_tuple_becomes_tuple():
    obj = check(sizes=(1.0, 2.0), shape=[3, 4], pair=[5, "c"])
    assert obj.sizes == [1.0, 2.0] and type(obj.sizes) is list
    assert obj.shape == (3, 4) and type(obj.shape) is tuple
    assert obj.pair == (5, "c")


def test_unchanged_containers_are_kept_as_given():
    sizes, extra = [1.0], {"a": 1}
    obj = check(sizes=sizes, extra=extra)
    assert obj.sizes is sizes and obj.extra is extra


def test_union_keeps_a_value_an_arm_takes_as_is():
    @dataclass
    class IntOrFloat:
        x: "int | float" = 0

    obj = IntOrFloat(x=3)
    check_options(obj)
    assert type(obj.x) is int


def test_frozen_dataclass_is_converted_too():
    obj = Frozen(lr=2)
    check_options(obj)
    assert obj.lr == 2.0 and type(obj.lr) is float


def test_classvar_and_unchecked_fields_are_skipped():
    obj = Skips(free="anything")  # type: ignore[arg-type]
    check_options(obj)
    message = refusal(Skips(checked="x"))  # type: ignore[arg-type]
    assert message.startswith("invalid options: checked='x' (expected an integer)")


def test_not_a_dataclass_instance_is_a_type_error():
    with pytest.raises(TypeError):
        check_options(Everything)
    with pytest.raises(TypeError):
        check_options({"n": 1})


# ------------------------------------------------------------------------------------------- refused values
@pytest.mark.parametrize(
    "values, piece",
    [
        ({"n": "abc"}, "n='abc' (expected an integer)"),
        ({"n": "4.5"}, "n='4.5' (expected an integer)"),
        ({"n": 4.5}, "n=4.5 (expected an integer)"),
        ({"n": 4.0}, "n=4.0 (expected an integer)"),
        ({"n": True}, "n=True (expected an integer)"),
        ({"n": None}, "n=None (expected an integer)"),
        ({"lr": "1e-3"}, "lr='1e-3' (expected a number)"),
        ({"lr": False}, "lr=False (expected a number)"),
        ({"flag": 1}, "flag=1 (expected true or false)"),
        ({"flag": "yes"}, "flag='yes' (expected true or false)"),
        ({"text": 3}, "text=3 (expected a string)"),
        ({"position": "back"}, "position='back' (expected one of 'end', 'middle', 'front')"),
        ({"init": 3}, "init=3 (expected a string or null)"),
        ({"legacy": "x"}, "legacy='x' (expected an integer or null)"),
        ({"depth": "al"}, "depth='al' (expected an integer or 'all')"),
        ({"depth": 2.0}, "depth=2.0 (expected an integer or 'all')"),
        ({"sizes": [1.0, "x"]}, "sizes=[1.0, 'x'] (expected a list of numbers)"),
        ({"sizes": 1.0}, "sizes=1.0 (expected a list of numbers)"),
        ({"shape": [1, 2.5]}, "shape=[1, 2.5] (expected a list of integers)"),
        ({"pair": [1]}, "pair=[1] (expected a list of 2 items (an integer, a string))"),
        ({"extra": [1]}, "extra=[1] (expected a mapping)"),
        ({"extra": {1: "a"}}, "extra={1: 'a'} (expected a mapping)"),
        ({"weights": {"x": "y"}}, "weights={'x': 'y'} (expected a mapping of strings to numbers)"),
        ({"nested": [[1], ["a"]]}, "nested=[[1], ['a']] (expected a list of lists of integers or null)"),
    ],
)
def test_refuses_wrong_types_with_a_readable_message(values, piece):
    message = refusal(Everything(**values))
    assert message.startswith(f"invalid options: {piece}")


@pytest.mark.parametrize("values, hint", [
    ({"n": "4.5"}, HINT),  # a quoted number: the quoting advice applies
    ({"lr": "1e-3"}, HINT),
    ({"flag": "true"}, HINT),
    ({"text": True}, BOOLEAN_WORDS_HINT),  # `on` / `yes` read by YAML as a boolean where a string was meant
    ({"lr": "nan"}, "give a finite number"),
    ({"n": "abc"}, None),  # a word, a list or a choice: no advice about quoting
    ({"sizes": [1.0, "x"]}, None),
    ({"position": "back"}, None),
])
def test_the_advice_after_a_wrong_type_is_given_only_where_it_applies(values, hint):
    message = refusal(Everything(**values))
    assert message.endswith(f" - {hint}") if hint else " - " not in message


def test_refused_value_is_left_as_given():
    obj = Everything(sizes=[1, "x"])  # type: ignore[list-item]
    refusal(obj)
    assert obj.sizes == [1, "x"]


def test_all_problems_in_one_line_with_prefix():
    message = refusal(Everything(n="abc", lr=True, position="back"), "coop.")  # type: ignore[arg-type]
    assert message == (
        "invalid options: coop.n='abc' (expected an integer); coop.lr=True (expected a number); "
        "coop.position='back' (expected one of 'end', 'middle', 'front')"
    )
    assert "\n" not in message


def test_option_error_is_a_value_error_listing_problems():
    with pytest.raises(ValueError) as info:
        check_options(Everything(n="a", text=1), "x.")  # type: ignore[arg-type]
    assert isinstance(info.value, OptionError)
    assert info.value.problems == ["x.n='a' (expected an integer)", "x.text=1 (expected a string)"]


# ------------------------------------------------------------------------------------------- ranges
def test_values_in_range_pass():
    obj = Ranged(n_ctx=0, lr=1e-9, ratio=1, depth="all", std=None, scales=[0.5, 2])
    check_options(obj)
    assert obj.ratio == 1.0 and obj.scales == [0.5, 2.0]


@pytest.mark.parametrize(
    "values, piece",
    [
        ({"n_ctx": -1}, "coop.n_ctx=-1 (must be >= 0)"),
        ({"lr": 0}, "coop.lr=0 (must be > 0)"),
        ({"lr": -0.5}, "coop.lr=-0.5 (must be > 0)"),
        ({"lr": math.nan}, "coop.lr=nan (must be a number, not nan)"),
        ({"ratio": 1.5}, "coop.ratio=1.5 (must be <= 1)"),
        ({"ratio": -0.1}, "coop.ratio=-0.1 (must be >= 0)"),
        ({"depth": 0}, "coop.depth=0 (must be >= 1)"),
        ({"std": 0.0}, "coop.std=0.0 (must be > 0)"),
        ({"scales": [1.0, -2.0]}, "coop.scales=[1.0, -2.0] (each item must be > 0)"),
    ],
)
def test_range_problems(values, piece):
    message = refusal(Ranged(**values), "coop.")
    assert message == f"invalid options: {piece}"  # a number out of range was written right: no quoting hint


def test_type_and_range_problems_together():
    message = refusal(Ranged(n_ctx=-1, lr="abc"), "coop.")  # type: ignore[arg-type]
    assert message == (
        "invalid options: coop.n_ctx=-1 (must be >= 0); coop.lr='abc' (expected a number)"
    )


# ------------------------------------------------------------------------------------------- opt
def test_opt_records_metadata_and_copies_mutable_defaults():
    fields = {f.name: f for f in dataclasses.fields(Ranged)}
    assert dict(fields["n_ctx"].metadata) == {"min": 0}
    assert dict(fields["ratio"].metadata) == {"min": 0, "max": 1}
    assert fields["scales"].default is dataclasses.MISSING
    first, second = Ranged(), Ranged()
    first.scales.append(3.0)
    assert second.scales == [1.0]


def test_opt_passes_help_metadata_and_field_arguments():
    @dataclass
    class Helped:
        x: int = opt(1, help="how many", metadata={"check": False}, repr=False)
        y: dict = opt({"a": [1]})

    fields = {f.name: f for f in dataclasses.fields(Helped)}
    assert dict(fields["x"].metadata) == {"help": "how many", "check": False}
    assert fields["x"].repr is False
    first, second = Helped(), Helped()
    first.y["a"].append(2)
    assert second.y == {"a": [1]}


# ------------------------------------------------------------------------------------------- describe_type
@pytest.mark.parametrize(
    "annotation, text",
    [
        (int, "an integer"),
        (float, "a number"),
        (bool, "true or false"),
        (str, "a string"),
        (type(None), "null"),
        (Any, "anything"),
        (Literal["end", "middle", "front"], "one of 'end', 'middle', 'front'"),
        (Literal["all"], "'all'"),
        (int | Literal["all"], "an integer or 'all'"),
        (Optional[str], "a string or null"),
        (None | float, "a number or null"),
        (int | str | None, "an integer, a string or null"),
        (list[float], "a list of numbers"),
        (list[int], "a list of integers"),
        (tuple[str, ...], "a list of strings"),
        (list, "a list"),
        (dict[str, Any], "a mapping"),
        (dict[str, int], "a mapping of strings to integers"),
        (list[list[float]], "a list of lists of numbers"),
    ],
)
def test_describe_type(annotation, text):
    assert describe_type(annotation) == text


# ------------------------------------------------------------------------------------------- parse_scalar
@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 0.001),
        ("1E5", 100000.0),
        ("-2e+2", -200.0),
        ("1.5e3", 1500.0),
        ("0.5", 0.5),
        ("4", 4),
        ("true", True),
        ("false", False),
        ("null", None),
        ("~", None),
        ("", None),
        ("none", None),
        ("None", None),
        ("abc", "abc"),
        ("'4'", "4"),
        ("a photo of a", "a photo of a"),
        ("[1, 2]", [1, 2]),
        ("[1e-3, 0.5]", [0.001, 0.5]),
        ("{a: 1}", {"a": 1}),
    ],
)
def test_parse_scalar(text, value):
    got = parse_scalar(text)
    assert got == value and type(got) is type(value)


def test_parse_scalar_refuses_invalid_yaml():
    with pytest.raises(OptionError, match=r"'\[1, 2' is not a valid value"):
        parse_scalar("[1, 2")


def test_parsed_text_passes_the_checker():
    obj = Everything(lr=parse_scalar("1e-3"), n=parse_scalar("4"), depth=parse_scalar("all"))
    check_options(obj)
    assert (obj.lr, obj.n, obj.depth) == (0.001, 4, "all")


def test_nan_is_named_as_nan_not_as_out_of_range():
    assert refusal(Ranged(lr=float("nan"))) == "invalid options: lr=nan (must be a number, not nan)"
