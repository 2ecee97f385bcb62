"""Data queries: boolean expressions over dimensions, parsed by hand (never ``eval``).

Grammar (case-insensitive keywords)::

    expr    := and ('OR' and)*
    and     := not ('AND' not)*
    not     := 'NOT' not | '(' expr ')' | cmp
    cmp     := NAME op value | NAME ['NOT'] 'IN' '(' item (',' item)* ')'
    op      := '=' | '==' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    item    := value | INT '..' INT [':' INT]          # inclusive range with optional stride
    value   := INT | 'string' | "string"

A data ID that lacks a dimension the query names is *unknown* for that comparison (SQL NULL
logic): the query rejects a data ID only when the answer is definitely false. This lets one query
constrain every level of a pipeline (``visit`` filters calibrations, yet a coadd keyed by
``tract, patch`` is not rejected merely for lacking ``visit``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batchprod.errors import QueryError

MAX_QUERY_LENGTH = 100_000
MAX_DEPTH = 100
MAX_RANGE = 10_000_000

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<range>-?\d+\s*\.\.\s*-?\d+(?:\s*:\s*\d+)?)
    | (?P<int>-?\d+)
    | (?P<str>'[^'\\]*'|"[^"\\]*")
    | (?P<op>==|!=|<>|<=|>=|=|<|>)
    | (?P<punct>[(),])
    | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"AND", "OR", "NOT", "IN"}

Tri = bool | None
Pred = Callable[[Mapping[str, Any]], Tri]


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: Any
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise QueryError(f"query: unexpected character {text[pos:].lstrip()[:1]!r} at position {pos}")
        kind = m.lastgroup or ""
        raw = m.group(kind)
        start = m.start(kind)
        if kind == "name" and raw.upper() in _KEYWORDS:
            toks.append(_Tok("kw", raw.upper(), start))
        elif kind == "int":
            toks.append(_Tok("int", int(raw), start))
        elif kind == "str":
            toks.append(_Tok("str", raw[1:-1], start))
        elif kind == "range":
            m2 = re.fullmatch(r"(-?\d+)\s*\.\.\s*(-?\d+)(?:\s*:\s*(\d+))?", raw)
            assert m2
            lo, hi = int(m2.group(1)), int(m2.group(2))
            step = int(m2.group(3) or 1)
            if step <= 0:
                raise QueryError(f"query: range stride must be positive at position {start}")
            if hi < lo:
                raise QueryError(f"query: empty range {lo}..{hi} at position {start}")
            if (hi - lo) // step > MAX_RANGE:
                raise QueryError(f"query: range {lo}..{hi} is too large at position {start}")
            toks.append(_Tok("range", (lo, hi, step), start))
        else:
            toks.append(_Tok(kind, raw, start))
        pos = m.end()
    return toks


def _and(a: Tri, b: Tri) -> Tri:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _or(a: Tri, b: Tri) -> Tri:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0
        self.names: set[str] = set()

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        t = self.peek()
        if t is None:
            raise QueryError("query: unexpected end of expression")
        self.i += 1
        return t

    def expect(self, kind: str, value: Any = None) -> _Tok:
        t = self.take()
        if t.kind != kind or (value is not None and t.value != value):
            want = value if value is not None else kind
            raise QueryError(f"query: expected {want!r} at position {t.pos}, got {t.value!r}")
        return t

    def parse(self) -> Pred:
        if not self.toks:
            return lambda d: True
        pred = self.expr(0)
        t = self.peek()
        if t is not None:
            raise QueryError(f"query: unexpected {t.value!r} at position {t.pos}")
        return pred

    def _depth(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryError(f"query: expression nested deeper than {MAX_DEPTH} levels")

    def expr(self, depth: int) -> Pred:
        self._depth(depth)
        terms = [self.conj(depth + 1)]
        while (t := self.peek()) is not None and t.kind == "kw" and t.value == "OR":
            self.take()
            terms.append(self.conj(depth + 1))
        if len(terms) == 1:
            return terms[0]

        def any_(d: Mapping[str, Any]) -> Tri:
            r: Tri = False
            for p in terms:
                r = _or(r, p(d))
                if r is True:
                    return True
            return r

        return any_

    def conj(self, depth: int) -> Pred:
        terms = [self.neg(depth + 1)]
        while (t := self.peek()) is not None and t.kind == "kw" and t.value == "AND":
            self.take()
            terms.append(self.neg(depth + 1))
        if len(terms) == 1:
            return terms[0]

        def all_(d: Mapping[str, Any]) -> Tri:
            r: Tri = True
            for p in terms:
                r = _and(r, p(d))
                if r is False:
                    return False
            return r

        return all_

    def neg(self, depth: int) -> Pred:
        self._depth(depth)
        t = self.peek()
        if t is not None and t.kind == "kw" and t.value == "NOT":
            self.take()
            inner = self.neg(depth + 1)
            return lambda d: None if (r := inner(d)) is None else not r
        if t is not None and t.kind == "punct" and t.value == "(":
            self.take()
            inner = self.expr(depth + 1)
            self.expect("punct", ")")
            return inner
        return self.cmp()

    def value(self) -> Any:
        t = self.take()
        if t.kind not in ("int", "str"):
            raise QueryError(f"query: expected a number or quoted string at position {t.pos}, got {t.value!r}")
        return t.value

    def cmp(self) -> Pred:
        t = self.take()
        if t.kind != "name":
            raise QueryError(f"query: expected a dimension name at position {t.pos}, got {t.value!r}")
        name = t.value
        self.names.add(name)
        nxt = self.take()
        negate = False
        if nxt.kind == "kw" and nxt.value == "NOT":
            negate = True
            nxt = self.take()
        if nxt.kind == "kw" and nxt.value == "IN":
            return self._in(name, negate)
        if negate or nxt.kind != "op":
            raise QueryError(f"query: expected a comparison after '{name}' at position {nxt.pos}")
        op = _CMP[nxt.value]
        rhs = self.value()

        def compare(d: Mapping[str, Any]) -> Tri:
            v = d.get(name)
            if v is None:
                return None
            try:
                return op(v, rhs)
            except TypeError:
                return False

        return compare

    def _in(self, name: str, negate: bool) -> Pred:
        self.expect("punct", "(")
        values: set[Any] = set()
        ranges: list[tuple[int, int, int]] = []
        while True:
            t = self.peek()
            if t is not None and t.kind == "range":
                self.take()
                ranges.append(t.value)
            else:
                values.add(self.value())
            t = self.take()
            if t.kind == "punct" and t.value == ")":
                break
            if not (t.kind == "punct" and t.value == ","):
                raise QueryError(f"query: expected ',' or ')' at position {t.pos}, got {t.value!r}")

        def member(d: Mapping[str, Any]) -> Tri:
            v = d.get(name)
            if v is None:
                return None
            hit = v in values or any(
                isinstance(v, int) and lo <= v <= hi and (v - lo) % st == 0 for lo, hi, st in ranges
            )
            return not hit if negate else hit

        return member


class DataQuery:
    """A compiled data query; ``accepts(data_id)`` is False only when the query is definitely false."""

    def __init__(self, text: str | None, known_dimensions: Iterable[str] | None = None) -> None:
        text = text or ""
        if len(text) > MAX_QUERY_LENGTH:
            raise QueryError(f"query: longer than {MAX_QUERY_LENGTH} characters")
        self.text = text
        parser = _Parser(text)
        self._pred = parser.parse()
        self.dimensions = frozenset(parser.names)
        if known_dimensions is not None:
            known = set(known_dimensions)
            unknown = sorted(self.dimensions - known)
            if unknown:
                raise QueryError(
                    f"query: unknown dimension '{unknown[0]}' (known: {', '.join(sorted(known))})"
                )

    def evaluate(self, data_id: Mapping[str, Any]) -> Tri:
        return self._pred(data_id)

    def accepts(self, data_id: Mapping[str, Any]) -> bool:
        return self._pred(data_id) is not False

    def __repr__(self) -> str:
        return f"DataQuery({self.text!r})"
