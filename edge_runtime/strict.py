"""Strict documents: these keys, these types, these ranges, nothing else.

The one reader behind every document the project reads (a bundle's manifest.yaml, the training config, a run's
run.json, the service config, the fleet's messages, the benchmarks' results.json). A document is checked against
a spec and every problem is named by where it is (the file, then the key path: `gating.stage1_threshold`,
`taxonomy[3]`):

    Number(low, high, integer=, above=)   an int or a float, never a bool, finite, inside the range
    Text(choices=, pattern=, ...)         a str
    Boolean()                             true or false only
    ListOf(item, distinct=)               a list
    MapOf(key, value)                     a mapping with free keys (aliases, probabilities)
    Keys({name: spec or Field(spec, default)}, extra=)   a mapping with these keys and, unless extra="keep",
                                          nothing else
    Optional(spec)                        the spec, or null
    spec_of(hint)                         the spec of a type hint: int, float, str, bool, list[T], dict[K, V],
                                          T | None, Annotated[T, spec], a dataclass or a TypedDict

read(value, spec, where) returns the value checked and converted (ints become floats where a number goes, a
dataclass is built) or raises StrictError naming every problem; problems(value, spec) lists them instead.
Standard library only: the board imports it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable

_MISSING = object()


class StrictError(ValueError):
    """A document that breaks its spec; the message names the file and each key that is wrong."""

    def __init__(self, where: str, problems: list[str]):
        self.where, self.problems = where, list(problems)
        shown = "; ".join(self.problems[:5]) + (f"; and {len(self.problems) - 5} more" if len(self.problems) > 5
                                                else "")
        super().__init__(f"{where}: {shown}" if where else shown)


def shown(value) -> str:
    """A value as the document spells it (true, null, "text"), ASCII, at most 60 characters."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError):
        text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _key(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _wrong(path: str, expected: str, value) -> str:
    return f"{path or 'the document'} must be {expected}, got {shown(value)}"


class Spec:
    """What one value must be. check() returns it converted, appending to `out` what is wrong."""

    def check(self, value, path: str, out: list[str]):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Anything(Spec):
    def check(self, value, path, out):
        return value


@dataclasses.dataclass(frozen=True)
class Number(Spec):
    """A bool is not a number; NaN and infinity are not either. integer: an int (3.0 is not one)."""
    low: float | None = None
    high: float | None = None
    integer: bool = False
    above: float | None = None        # exclusive lower bound

    @property
    def expected(self) -> str:
        what = "an integer" if self.integer else "a number"
        lo = f"[{_num(self.low)}" if self.low is not None else f"({_num(self.above)}" if self.above is not None \
            else None
        if lo is not None and self.high is not None:
            return f"{what} in {lo}, {_num(self.high)}]"
        if lo is not None:
            return f"{what} {'>=' if self.low is not None else '>'} {lo[1:]}"
        return f"{what} <= {_num(self.high)}" if self.high is not None else what

    def check(self, value, path, out):
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                or (self.low is not None and value < self.low) or (self.above is not None and value <= self.above) \
                or (self.high is not None and value > self.high):
            nonfinite = isinstance(value, float) and not math.isfinite(value)
            out.append(_wrong(path, self.expected.replace("a number", "a finite number", 1) if nonfinite
                              else self.expected, value))
            return value
        return int(value) if self.integer else float(value)


@dataclasses.dataclass(frozen=True)
class Text(Spec):
    """A str: one of `choices`, matching `pattern` (whole), of min_len..max_len characters; `check(value, path)`
    raises ValueError (its text is the problem) for a rule of its own (a class name)."""
    choices: tuple = ()
    pattern: str | None = None
    min_len: int = 0
    max_len: int | None = None
    describe: str = ""                # what a matching text is, for the message
    rule: Callable | None = None

    def check(self, value, path, out):
        if not isinstance(value, str):
            out.append(_wrong(path, self.describe or "text", value))
        elif self.choices and value not in self.choices:
            out.append(_wrong(path, f"one of {list(self.choices)}", value))
        elif (self.pattern is not None and not re.fullmatch(self.pattern, value)) or len(value) < self.min_len \
                or (self.max_len is not None and len(value) > self.max_len):
            limit = f"text of {self.min_len}..{self.max_len} characters" if self.max_len is not None else \
                f"text of at least {self.min_len} characters"
            out.append(_wrong(path, self.describe or limit, value))
        elif self.rule is not None:
            try:
                self.rule(value, path)
            except ValueError as exc:
                out.append(str(exc))
        return value


@dataclasses.dataclass(frozen=True)
class Boolean(Spec):
    def check(self, value, path, out):
        if not isinstance(value, bool):
            out.append(_wrong(path, "true or false", value))
        return value


@dataclasses.dataclass(frozen=True)
class Optional(Spec):
    """The spec, or null (None)."""
    spec: Spec

    def check(self, value, path, out):
        return None if value is None else self.spec.check(value, path, out)


@dataclasses.dataclass(frozen=True)
class ListOf(Spec):
    item: Spec = Anything()
    min_len: int = 0
    max_len: int | None = None
    distinct: bool = False

    def check(self, value, path, out):
        if not isinstance(value, list):
            out.append(_wrong(path, "a list", value))
            return value
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            size = f"{self.min_len}..{self.max_len}" if self.max_len is not None else f"at least {self.min_len}"
            out.append(_wrong(path, f"a list of {size} entries", value))
        if self.distinct and len({shown(v) for v in value}) != len(value):
            out.append(_wrong(path, "a list of distinct entries", value))
        return [self.item.check(v, f"{path}[{i}]", out) for i, v in enumerate(value)]


@dataclasses.dataclass(frozen=True)
class MapOf(Spec):
    key: Spec = Text()
    value: Spec = Anything()
    max_len: int | None = None
    min_len: int = 0

    def check(self, value, path, out):
        if not isinstance(value, dict):
            out.append(_wrong(path, "a mapping", value))
            return value
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            size = f"{self.min_len}..{self.max_len}" if self.max_len is not None else f"at least {self.min_len}"
            out.append(_wrong(path, f"a mapping of {size} entries", value))
            return value
        return {self.key.check(k, f"{path} key", out): self.value.check(v, _key(path, k), out)
                for k, v in value.items()}


@dataclasses.dataclass(frozen=True)
class Field:
    """A key of a Keys mapping: its spec and, when it may be left out, its default (MISSING: required)."""
    spec: Spec
    default: typing.Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclasses.dataclass(frozen=True)
class Keys(Spec):
    """A mapping with these keys (a spec alone: required; Field(spec, default): optional) and nothing else;
    extra="keep": other keys are allowed and kept as they are (a wire format a newer sender may extend).
    build: called with the checked keys (a dataclass)."""
    fields: dict
    extra: str = "refuse"
    build: Callable | None = None

    def field(self, name: str) -> Field:
        f = self.fields[name]
        return f if isinstance(f, Field) else Field(f)

    def check(self, value, path, out):
        if not isinstance(value, dict):
            out.append(_wrong(path, "a mapping", value))
            return value
        where = f"{path}: " if path else ""
        for name in self.fields:
            if name not in value and self.field(name).required:
                out.append(f"{where}missing key {name!r}")
        if self.extra != "keep":
            allowed = ", ".join(self.fields)
            out += [f"{where}unknown key {k!r} (allowed: {allowed})" for k in value if k not in self.fields]
        result = {k: v for k, v in value.items() if k not in self.fields} if self.extra == "keep" else {}
        for name in self.fields:
            f = self.field(name)
            if name in value:
                result[name] = f.spec.check(value[name], _key(path, name), out)
            elif not f.required and self.build is None:
                result[name] = f.default() if callable(f.default) else f.default
        if self.build is not None and not out:
            return self.build(**result)
        return result


def spec_of(hint) -> Spec:
    """The spec of a type hint (see the module docstring); Annotated[T, spec] says it explicitly."""
    if isinstance(hint, Spec):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return next((a for a in args[1:] if isinstance(a, Spec)), None) or spec_of(args[0])
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        fields = {}
        for f in dataclasses.fields(hint):
            default = f.default if f.default is not dataclasses.MISSING else \
                f.default_factory if f.default_factory is not dataclasses.MISSING else _MISSING
            fields[f.name] = Field(spec_of(hints[f.name]), default)
        return Keys(fields, build=hint)
    if isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__required_keys__"):   # TypedDict
        hints = typing.get_type_hints(hint, include_extras=True)
        return Keys({k: spec_of(_strip_required(t)) if k in hint.__required_keys__ else
                     Field(spec_of(_strip_required(t)), None) for k, t in hints.items()})
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = spec_of(rest[0]) if len(rest) == 1 else Anything()
        return Optional(inner) if len(rest) < len(args) else inner
    if origin is list:
        return ListOf(spec_of(args[0]) if args else Anything())
    if origin is dict:
        return MapOf(spec_of(args[0]), spec_of(args[1])) if args else MapOf()
    simple = {bool: Boolean(), int: Number(integer=True), float: Number(), str: Text(), list: ListOf(),
              dict: MapOf(key=Anything()), typing.Any: Anything()}
    if hint in simple:
        return simple[hint]
    raise TypeError(f"no strict spec for the type {hint!r}")


def _strip_required(hint):
    while typing.get_origin(hint) in (typing.NotRequired, typing.Required):
        hint = typing.get_args(hint)[0]
    return hint


def problems(value, spec, root: str = "") -> list[str]:
    """Everything wrong with `value` against `spec` (a Spec or a type hint); empty when it matches."""
    out: list[str] = []
    spec_of(spec).check(value, root, out)
    return out


def read(value, spec, where: str = "", root: str = "", error: type[Exception] | None = None):
    """`value` checked against `spec` (a Spec or a type hint) and converted; StrictError (or `error`, built
    from its message) naming `where` (the file) and every problem."""
    out: list[str] = []
    result = spec_of(spec).check(value, root, out)
    if out:
        exc = StrictError(where, out)
        if error is not None:
            raise error(str(exc)) from None
        raise exc
    return result
