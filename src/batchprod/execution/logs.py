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


#: lines batchprod itself writes into a job's logs (the wrapper's and the job script's): not the payload's
_OURS = re.compile(
    r"^(?:error: .*: (?:command exited with code -?\d+|payload killed by SIG\w+)\b.*"
    r"|error: (?:oom|stage-in|stage-out|timeout|finalJob|fenced|post-job)\b.*"
    r"|quantum \S+(?: \S+=\S*)*|\+ .*)$"
)
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Warning)?(?::.*)?$")
_MEANINGFUL = re.compile(r"[A-Za-z0-9]")


def _said(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if _MEANINGFUL.search(ln) and not _OURS.match(ln.strip())]


_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def _cause_in(lines: list[str]) -> str | None:
    """The exception line of the last traceback, else the last meaningful line. Of a chained
    traceback (``raise X from Y``) the first one printed is taken: the original cause, not a symptom."""
    if not lines:
        return None
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:
        k = len(starts) - 1
        while k > 0 and lines[starts[k] - 1].startswith(_CHAINED):
            k -= 1
        for ln in lines[starts[k] + 1:]:
            if not ln[:1].isspace() and _EXCEPTION.match(ln.strip()):
                return ln.strip()[:500]
    return lines[-1].strip()[:500]


def causal_line(stderr: str | Path | None, stdout: str | Path | None = None) -> str | None:
    """What the payload itself said last about its failure: the last meaningful line of its stderr
    (a traceback reduced to its final exception), else of its stdout; None if it said nothing.
    batchprod's own lines (``error: ...: command exited with code 5``) are not the payload's."""
    return _cause_in(_said(_read(stderr))) or _cause_in(_said(_read(stdout)))


def batchprod_line(stderr: str | Path | None) -> str | None:
    """The last line batchprod itself wrote into the job's stderr (stage-out, oom, ...), if any."""
    ours = [ln.strip() for ln in _read(stderr).splitlines() if _OURS.match(ln.strip()) and ln.startswith("error:")]
    return ours[-1][:500] if ours else None


def tail(path: str | Path | None, n: int = 10) -> list[str]:
    return _read(path).splitlines()[-n:]


_NORMALIZE = [
    (re.compile(r"0x[0-9a-fA-F]+"), "<hex>"),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<uuid>"),
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
