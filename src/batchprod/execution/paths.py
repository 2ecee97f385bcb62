"""Reading a run's own files without ever leaving its directory.

Log paths come from the state store and file names from the submit directory, and either may have
been damaged or planted: a log path of ``/etc/passwd``, or ``logs/x.err`` a symlink to it. Whatever
shows a run's files to someone else (the service, a report) opens them through :func:`open_in`,
which resolves every symlink first and refuses anything whose real path is outside the run's real
directory, or that is not a regular file (a FIFO would hang the reader).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from batchprod.errors import RunError

MAX_TAIL = 1 << 20  # read at most the last MiB of a log


class OutsideRunError(RunError):
    """A file of a run resolves to somewhere outside the run's directory (or is not a regular file)."""


def resolve_in(run_dir: str | Path, path: str | Path) -> Path | None:
    """The real path of ``path`` (relative paths are taken from ``run_dir``) if it exists and lies
    inside the real ``run_dir``, after every symlink; else None."""
    base = Path(run_dir).resolve()
    p = Path(path)
    try:
        real = (p if p.is_absolute() else base / p).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, a bad name
        return None
    return real if real.is_relative_to(base) else None


def check_in(run_dir: str | Path, path: str | Path) -> None:
    """Raise OutsideRunError if ``path`` exists (or is a symlink) and resolves outside ``run_dir``."""
    p = Path(path) if Path(path).is_absolute() else Path(run_dir) / path
    if (p.exists() or p.is_symlink()) and resolve_in(run_dir, p) is None:
        raise OutsideRunError(f"{p}: leads outside the run directory {run_dir}; not read")


def open_in(run_dir: str | Path, path: str | Path) -> BinaryIO:
    """Open a regular file of the run for binary reading. OutsideRunError if it resolves outside the
    run's directory or is not a regular file; FileNotFoundError if it does not exist."""
    p = Path(path) if Path(path).is_absolute() else Path(run_dir) / path
    real = resolve_in(run_dir, p)
    if real is None:
        if not (p.exists() or p.is_symlink()):
            raise FileNotFoundError(2, "No such file", str(p))
        raise OutsideRunError(f"{p}: leads outside the run directory {run_dir}; not read")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutsideRunError(f"{p}: not a regular file; not read")
        # a directory on the way swapped for a symlink between resolving and opening: ask the kernel
        with contextlib.suppress(OSError):
            opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not opened.is_relative_to(Path(run_dir).resolve()):
                raise OutsideRunError(f"{p}: leads outside the run directory {run_dir}; not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_tail_in(run_dir: str | Path, path: str | Path | None, max_bytes: int = MAX_TAIL) -> str:
    """The last ``max_bytes`` of a run's file as text; "" if there is no path or no file. A file
    outside the run is not opened: the text says so instead."""
    if not path:
        return ""
    try:
        with open_in(run_dir, path) as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode(errors="replace")
    except OutsideRunError as exc:
        return f"<not shown: {exc}>"
    except OSError:
        return ""


def tail_in(run_dir: str | Path, path: str | Path | None, n: int = 10) -> list[str]:
    """The last ``n`` lines of a run's log (the safe twin of :func:`batchprod.execution.logs.tail`)."""
    if n <= 0:
        return []
    return read_tail_in(run_dir, path).splitlines()[-n:]
