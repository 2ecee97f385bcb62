"""Reading YAML that a user (or anyone) wrote, without letting it hurt the process.

``yaml.safe_load`` is safe from code execution but not from everything else: a 10,000-deep nesting
overflows the stack, a few lines of aliases ("billion laughs") expand to 10^9 nodes the moment
anything walks them, a duplicate key silently drops a value, a file that is not UTF-8 or holds an
escaped NUL turns into an exception far from its cause. This loader bounds all of that while it
composes the document, before anything is expanded, and turns every problem into one
:class:`ConfigError` line naming the file and the line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode
from yaml.resolver import Resolver

from batchprod.errors import ConfigError

#: A submit or pipeline YAML is a few KB; anything bigger than this is not one.
MAX_FILE_BYTES = 2**20
#: Nesting depth of collections (aliases count with the depth of what they point to).
MAX_DEPTH = 64
#: Nodes of the document once every alias is expanded: bounds what any later walk can cost.
MAX_NODES = 200_000
#: Digits of an integer literal (Python refuses > 4300 with a ValueError; no config needs > 19).
MAX_INT_DIGITS = 30
#: Integers anywhere in a config fit in 64 bits (SQLite, numpy and JSON consumers).
MAX_INT = 2**63 - 1

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def one_line(text: str, limit: int = 300) -> str:
    """Text fit for a one-line error message: control characters escaped, long text cut short."""
    out = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def show(value: Any, limit: int = 60) -> str:
    """A value's repr for an error message: one line, at most ``limit`` characters."""
    try:
        r = repr(value) if not isinstance(value, (list, dict)) or _small(value) else f"<a {type(value).__name__}>"
    except RecursionError:  # a self-referencing structure handed in by a caller
        r = f"<a {type(value).__name__}>"
    return one_line(r, limit)


def _small(value: Any, budget: int = 50) -> bool:
    """True if a container has at most ``budget`` nodes (so its repr is cheap and bounded)."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > budget:
            return False
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


class _Bounds:
    """Composer and constructor hooks that bound depth and expanded size, and refuse recursive
    aliases, duplicate keys, NUL characters and absurd integers, all while composing (before any
    alias is expanded). Mixed into a SafeLoader; the YAML parser itself never recurses."""

    def _init_bounds(self) -> None:
        # per open collection: [expanded size of its children so far, height of its deepest child]
        self._open: list[list[int]] = []
        self._open_anchors: set[str] = set()
        self._anchor_size: dict[str, tuple[int, int]] = {}

    def _fail(self, problem: str, mark: Any) -> None:
        raise ComposerError(None, None, problem, mark)

    def _account(self, size: int, height: int, mark: Any) -> None:
        if len(self._open) + height > MAX_DEPTH:
            self._fail(f"nesting deeper than {MAX_DEPTH} levels", mark)
        if self._open:
            parent = self._open[-1]
            parent[0] += size
            parent[1] = max(parent[1], height)
            if parent[0] > MAX_NODES:
                self._fail(f"document larger than {MAX_NODES} nodes once its aliases are expanded", mark)
        elif size > MAX_NODES:
            self._fail(f"document larger than {MAX_NODES} nodes once its aliases are expanded", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            anchor = event.anchor
            if anchor in self._open_anchors:
                self._fail(f"recursive alias *{anchor} (it points inside its own anchor)", event.start_mark)
            if anchor in self._anchor_size:
                self._account(*self._anchor_size[anchor], event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[misc]
        event = self.peek_event()
        anchor = event.anchor
        is_collection = isinstance(event, (SequenceStartEvent, MappingStartEvent))
        if is_collection:
            if len(self._open) + 1 > MAX_DEPTH:
                self._fail(f"nesting deeper than {MAX_DEPTH} levels", event.start_mark)
            self._open.append([0, 0])
            if anchor is not None:
                self._open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            if is_collection:
                size, height = self._open.pop()
                if anchor is not None:
                    self._open_anchors.discard(anchor)
        if is_collection:
            size, height = size + 1, height + 1
        else:
            size, height = 1, 0
            if isinstance(event, ScalarEvent):
                self._check_scalar(node)
        if anchor is not None:
            self._anchor_size[anchor] = (size, height)
        self._account(size, height, event.start_mark)
        return node

    def _check_scalar(self, node: ScalarNode) -> None:
        if "\x00" in node.value:
            self._fail("NUL character in a string", node.start_mark)
        if node.tag == _INT_TAG and sum(c.isdigit() for c in node.value) > MAX_INT_DIGITS:
            self._fail(f"integer with more than {MAX_INT_DIGITS} digits", node.start_mark)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if first is not key_node:
                    raise ConstructorError(
                        None, None,
                        f"duplicate key {show(key)} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]


class _PyLoader(_Bounds, yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._init_bounds()


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Bounds, Composer, CParser, SafeConstructor, Resolver):  # type: ignore[misc]
        """libyaml's parser (10x faster) under the Python composer, so the bounds above apply."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
            self._init_bounds()

    _Loader: type = _CLoader
else:  # pragma: no cover
    _Loader = _PyLoader


def _yaml_message(exc: yaml.YAMLError) -> tuple[str, str]:
    """(' line N' or '', problem) of a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if isinstance(exc, yaml.reader.ReaderError):
        return "", f"byte {exc.position}: {one_line(exc.reason)}"
    if problem is None:
        problem = str(exc).split("\n")[0]
    context = getattr(exc, "context", None)
    if context and not context.startswith("while"):
        problem = f"{problem} ({context})"
    return (f" line {mark.line + 1}" if mark is not None else ""), one_line(problem)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with every bound above; any problem is a one-line ConfigError."""
    loader = None
    try:
        loader = _Loader(text)
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        at, problem = _yaml_message(exc)
        raise ConfigError(f"{where}:{at} invalid YAML: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # constructors of odd scalars (e.g. a timestamp 2024-13-45) raise plain Python errors
        raise ConfigError(f"{where}: invalid YAML: {one_line(exc)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def is_file(path: Path) -> bool:
    """Path.is_file that says False (not OSError) for a name too long or otherwise unusable."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    """Path.exists that says False (not OSError) for a name too long or otherwise unusable."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def read_yaml(path: Path, what: str = "") -> Any:
    """Read one YAML file: a regular, readable, UTF-8 file of bounded size, parsed by parse_yaml."""
    hint = f" ({what})" if what else ""
    if not is_file(path):
        if exists(path):  # (a name too long or unusable is not there: file not found)
            run = any(exists(path / f) for f in ("state.db", "state-db.json", "workflow.bpwf"))
            raise ConfigError(f"{path}: a run's submit directory, not a submit file: run or continue it with "
                              f"'batchprod restart {path}'" if run else f"{path}: a directory, not a submit file")
        raise ConfigError(f"{path}: file not found{hint}")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {one_line(exc.strerror or exc)}{hint}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MB: not a config file{hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    return parse_yaml(text.removeprefix("\ufeff"), str(path))


def check_plain(
    data: Any,
    fail: Callable[[str, str], ConfigError],
    *,
    allow_dates: bool = True,
    prefix: str = "",
) -> None:
    """Walk a loaded tree iteratively and refuse what no config should hold.

    Refused: more than MAX_NODES nodes or MAX_DEPTH levels (self-referencing data included), NUL
    characters, non-finite floats, integers beyond 64 bits, non-string mapping keys below the top
    and types YAML can produce but JSON cannot hold (bytes, sets, and dates unless allowed).
    ``fail(keypath, problem)`` builds the error to raise.
    """
    stack: list[tuple[str, Any, int]] = [(prefix, data, 0)]
    count = 0
    while stack:
        path, v, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise fail(path, f"nested too deep or too large (more than {MAX_DEPTH} levels or {MAX_NODES} values)")
        if isinstance(v, dict):
            for k, sub in v.items():
                if not isinstance(k, str):
                    raise fail(path, f"key {show(k)}: keys must be strings")
                if "\x00" in k:
                    raise fail(path, f"key {show(k)}: NUL character in a key")
                stack.append((f"{path}.{k}" if path else k, sub, depth + 1))
        elif isinstance(v, list):
            stack.extend((path, sub, depth + 1) for sub in v)
        elif isinstance(v, str):
            if "\x00" in v:
                raise fail(path, "NUL character in a string")
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not -MAX_INT <= v <= MAX_INT:
                raise fail(path, f"integer {show(v, 30)} out of range (at most 64 bits)")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise fail(path, f"expected a finite number, got {v!r}")
        elif isinstance(v, date) and allow_dates:
            pass
        else:
            raise fail(path, f"unsupported value of type {type(v).__name__}: {show(v)}")
