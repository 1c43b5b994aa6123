"""One parser for everything named with options: `name` or `name:key=value,key=value`.

Selection strategies ("sprm:agg=min"), search methods ("prune:signal=confidence,keep=90"), relax
contenders ("qadam:warmup_steps=10") and tasks ("gym:chain_sum:min_terms=2,max_terms=3", a name of two
parts) are written this way and read here. It imports nothing from thinkscale, so every layer may use it.

    >>> parse_spec("prune:keep=90,window=8", what="search")
    Spec(name='prune', options={'keep': 90, 'window': 8})
    >>> parse_spec("gym:chain_sum:max_terms=3", what="task", name_parts=2).name
    'gym:chain_sum'

Values are typed. Against a declared type when the caller gives one (`types`, e.g. a dataclass's field
types from `field_types`): bool ("true"/"false"), int, float, str, `X | None` ("none"), and tuples or
lists of those (items separated by spaces). Otherwise inferred: "true"/"false" (any case) become bool,
then int, then float, else the text. Every error is a one-line `SpecError` (a ValueError) naming the
spec, the option and the valid ones.

The things those names name live in `Registry`s, one shape for all of them (selection strategies,
search methods, tasks, relax algorithms): entries added under a name, looked up with an error that
lists the valid names.
"""
from __future__ import annotations

import dataclasses
import types as _types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar


class SpecError(ValueError):
    """A malformed spec or option (one line)."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its name and its typed options (in the order written)."""

    name: str
    options: dict[str, Any]


def split_spec(text: str, *, what: str = "spec", name_parts: int = 1) -> tuple[str, list[tuple[str, str]]]:
    """(name, [(key, raw value), ...]) of `text`; nothing is typed or checked against valid options.

    The name is the first `name_parts` colon-separated parts ("gym:chain_sum" for 2); the rest is a
    comma-separated list of key=value items. Empty items are skipped; a key given twice is an error.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"a {what} must be a non-empty string, got {text!r}")
    text = text.strip()
    pieces = text.split(":", name_parts)
    name_pieces = [p.strip() for p in pieces[:name_parts]]
    if len(name_pieces) < name_parts or not all(name_pieces):
        raise SpecError(f"{what} {text!r}: the name must have {name_parts} non-empty part(s) separated by ':'"
                        if name_parts > 1 else f"{what} {text!r}: empty name")
    name = ":".join(name_pieces)
    rest = pieces[name_parts] if len(pieces) > name_parts else ""
    items: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"bad option {item!r}: not key=value ({what} spec {text!r})")
        if any(key == seen for seen, _ in items):
            raise SpecError(f"{what} {name!r}: option {key!r} is given twice")
        items.append((key, value.strip()))
    return name, items


def typed_options(name: str, items: list[tuple[str, str]], *, what: str = "spec",
                  types: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{key: typed value} for the (key, raw value) pairs of `split_spec`.

    `types`: the valid options and their types (`Any` = inferred); None accepts any key, inferred.
    `defaults` only decorates the list of valid options in an error ("agg=geomean").
    """
    options: dict[str, Any] = {}
    for key, raw in items:
        if types is not None and key not in types:
            valid = ", ".join(f"{k}={defaults[k]}" if defaults and k in defaults else k for k in types) or "none"
            raise SpecError(f"bad option {key + '=' + raw!r}: {what} {name!r} has no option {key!r}; valid: {valid}")
        try:
            options[key] = coerce(raw, types[key], key) if types is not None else parse_value(raw)
        except SpecError as error:
            raise SpecError(f"{what} {name!r}: {error}") from None
    return options


def parse_spec(text: str, *, what: str = "spec", types: Mapping[str, Any] | None = None,
               defaults: Mapping[str, Any] | None = None, name_parts: int = 1) -> Spec:
    """`split_spec` then `typed_options`, for specs whose valid options do not depend on the name."""
    name, items = split_spec(text, what=what, name_parts=name_parts)
    return Spec(name, typed_options(name, items, what=what, types=types, defaults=defaults))


def parse_value(text: str) -> bool | int | float | str:
    """'true'/'false' (any case) -> bool, then int ('3'), then float ('0.5'), else the stripped text."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number"}


def coerce(text: str, kind: Any, key: str = "value") -> Any:
    """`text` as a value of type `kind`; SpecError naming `key` when it is not one.

    bool, int, float, str; `X | None` ("none" is None); tuple[X, ...] and list[X] (items separated by
    spaces); any other type (and `Any`) is inferred by `parse_value`.
    """
    text = text.strip()
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is _types.UnionType:
        members = [a for a in args if a is not type(None)]
        if len(members) < len(args) and text.lower() == "none":
            return None
        return coerce(text, members[0], key) if len(members) == 1 else parse_value(text)
    if origin in (tuple, list):
        item = args[0] if args else Any
        values = [coerce(part, item, key) for part in text.split()]
        return tuple(values) if origin is tuple else values
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise SpecError(f"option {key} must be {_KIND_WORDS[bool]}, got {text!r}")
        return text.lower() == "true"
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise SpecError(f"option {key} must be {_KIND_WORDS[kind]}, got {text!r}") from None
    if kind is str:
        return text
    return parse_value(text)


def field_types(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """{field: type} of a dataclass, in field order, less `exclude`; a field whose annotation cannot be
    resolved takes its default's type (`Any` without a default)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable here
        hints = {}
    found = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.name in hints:
            found[f.name] = hints[f.name]
        elif f.default is not dataclasses.MISSING and f.default is not None:
            found[f.name] = type(f.default)
        else:
            found[f.name] = Any
    return found


T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, in the order they were added.

        >>> from thinkscale.spec import Registry
        >>> methods = Registry("search method")
        >>> @methods.register("beam")
        ... def beam(): ...
        >>> list(methods), methods.lookup("beam") is beam
        (['beam'], True)
        >>> methods.lookup("greedy")
        Traceback (most recent call last):
        ...
        thinkscale.spec.SpecError: unknown search method 'greedy'; valid: beam
    """

    def __init__(self, what: str, entries: Mapping[str, T] | None = None):
        self.what = what  # how errors name an entry ("selection strategy", "task", ...)
        self._entries: dict[str, T] = {}
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that adds what it decorates under `name`."""
        return lambda entry: self.add(name, entry)

    def lookup(self, name: str, *, also: str = "") -> T:
        """The entry called `name`; a SpecError listing the valid names (and `also`, more of them) if none.
        (`get` is Mapping's: None for an unknown name.)"""
        if name not in self._entries:
            valid = ", ".join(self._entries) + (f", {also}" if also else "")
            raise SpecError(f"unknown {self.what} {name!r}; valid: {valid}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
