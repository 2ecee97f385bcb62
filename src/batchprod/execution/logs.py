"""Reading job logs: the first causal error line, the tail, and a normalized failure signature."""

from __future__ import annotations

import re
from pathlib import Path

_ERROR = re.compile(
    r"^\s*(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\b.*"  # Python exception lines
    r"|(?:error|fatal|ERROR|FATAL|Error|Fatal)\b[:\s].*"  # tool messages
    r"|.*\bSegmentation fault\b.*|.*\bKilled\b.*|.*\bcore dumped\b.*)$"
)
MAX_READ = 1 << 20  # read at most the last MiB of a log


def _read(path: str | Path | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - MAX_READ))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def first_error_line(path: str | Path | None) -> str | None:
    """The first line that looks like an error: in chained Python tracebacks the original cause is
    printed first, so this is the cause rather than a downstream symptom."""
    for line in _read(path).splitlines():
        if _ERROR.match(line) and not line.lstrip().startswith("Traceback"):
            return line.strip()[:500]
    return None


def tail(path: str | Path | None, n: int = 10) -> list[str]:
    return _read(path).splitlines()[-n:]


_NORMALIZE = [
    (re.compile(r"0x[0-9a-fA-F]+"), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"(?:/[\w.\-]+)+"), "<path>"),
    (re.compile(r"\b\d+(?:\.\d+)?\b"), "<n>"),
]


def signature(line: str | None) -> str:
    """An error line with numbers, paths, quoted strings and addresses replaced: 5,000 jobs failing
    the same way share one signature."""
    if not line:
        return "<no error line>"
    for rx, repl in _NORMALIZE:
        line = rx.sub(repl, line)
    return line
