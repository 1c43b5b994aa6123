"""The one `name:key=value` parser (thinkscale.spec), by hand-written cases."""
from dataclasses import dataclass
from typing import Optional

import pytest

from thinkscale.spec import Spec, SpecError, coerce, field_types, parse_spec, parse_value, split_spec, typed_options


def test_split_names_and_items():
    assert split_spec("sprm") == ("sprm", [])
    assert split_spec(" prune : keep = 90 , window=8 ,") == ("prune", [("keep", "90"), ("window", "8")])
    assert split_spec("gym:chain_sum", name_parts=2) == ("gym:chain_sum", [])
    assert split_spec("gym:chain_sum:min_terms=2,max_terms=3", name_parts=2) == \
        ("gym:chain_sum", [("min_terms", "2"), ("max_terms", "3")])
    # a value may hold '=' and ':' (only the first '=' of an item splits)
    assert split_spec("x:a=b=c,t=1:2") == ("x", [("a", "b=c"), ("t", "1:2")])


@pytest.mark.parametrize("text, parts, message", [
    ("", 1, "a task must be a non-empty string, got ''"),
    (None, 1, "a task must be a non-empty string, got None"),
    (":a=1", 1, "task ':a=1': empty name"),
    ("gym", 2, "task 'gym': the name must have 2 non-empty part(s)"),
    ("gym:", 2, "task 'gym:': the name must have 2 non-empty part(s)"),
    ("gym::a=1", 2, "task 'gym::a=1': the name must have 2"),
    ("x:flag", 1, "bad option 'flag': not key=value (task spec 'x:flag')"),
    ("x:=3", 1, "bad option '=3': not key=value"),
    ("x:a=1,a=2", 1, "task 'x': option 'a' is given twice"),
])
def test_split_errors_are_one_line(text, parts, message):
    with pytest.raises(SpecError) as info:
        split_spec(text, what="task", name_parts=parts)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI reports ValueError as one line, exit 2


def test_inferred_values():
    assert [parse_value(v) for v in ("3", "-2", "0.5", "1e3", "True", "false", "shift_one", " a b ")] == \
        [3, -2, 0.5, 1000.0, True, False, "shift_one", "a b"]
    assert type(parse_value("3")) is int and type(parse_value("3.0")) is float
    assert parse_spec("deepconf:eta=10,measure=tail").options == {"eta": 10, "measure": "tail"}


def test_declared_types():
    assert coerce("3", int) == 3 and coerce("3", float) == 3.0 and type(coerce("3", float)) is float
    assert coerce("TRUE", bool) is True and coerce("false", bool) is False
    assert coerce("3", str) == "3"  # a str option keeps digits as text
    assert coerce("none", Optional[int]) is None and coerce("7", Optional[int]) == 7
    assert coerce("none", int | None) is None and coerce("none", str) == "none"
    assert coerce("+ - *", tuple[str, ...]) == ("+", "-", "*")
    assert coerce("0.9 0.99", tuple[float, float] | None) == (0.9, 0.99)
    assert coerce("1 2", list[int]) == [1, 2]
    for text, kind, message in [("3.5", int, "option n must be an integer, got '3.5'"),
                                ("lots", float, "option n must be a number, got 'lots'"),
                                ("yes", bool, "option n must be true or false, got 'yes'"),
                                ("1 x", tuple[int, ...], "option n must be an integer, got 'x'")]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(")):
            coerce(text, kind, "n")


@dataclass
class Config:
    method: str = "a"
    width: int = 4
    keep: float = 90.0
    warmup: int | None = None
    verbose: bool = False


def test_checked_against_a_dataclass():
    types = field_types(Config, exclude=("method",))
    assert types == {"width": int, "keep": float, "warmup": int | None, "verbose": bool}
    spec = parse_spec("beam:width=2,keep=50,warmup=none,verbose=true", what="search", types=types)
    assert spec == Spec("beam", {"width": 2, "keep": 50.0, "warmup": None, "verbose": True})
    with pytest.raises(SpecError) as info:
        parse_spec("beam:depth=3", what="search", types=types)
    assert str(info.value) == ("bad option 'depth=3': search 'beam' has no option 'depth'; "
                               "valid: width, keep, warmup, verbose")
    with pytest.raises(SpecError, match="spec .beam.: option width must be an integer, got .wide.$"):
        parse_spec("beam:width=wide", types=types)


def test_valid_options_listed_with_defaults_or_none():
    with pytest.raises(SpecError, match="bad option 'k=3': strategy 'sprm' has no option 'k'; valid: agg=geomean$"):
        typed_options("sprm", [("k", "3")], what="strategy", types={"agg": str}, defaults={"agg": "geomean"})
    with pytest.raises(SpecError, match="'ddp' has no option 'x'; valid: none$"):
        typed_options("ddp", [("x", "1")], what="contender", types={})
