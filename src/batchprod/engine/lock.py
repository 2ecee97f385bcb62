"""One engine per run, ever: an OS lock on a file in the submit directory, held for the engine's life.

``fcntl.flock`` locks belong to an open file description, so the kernel drops them when the holder
dies (even by ``kill -9``): no stale lock to clean up, no pid guessing. A ``--detach`` parent takes
the lock *before* it forks the engine and hands the descriptor over, so of two racing submits or
restarts exactly one gets it and the other is told at once who drives the run.

flock is per host on most network filesystems: two engines on two hosts sharing an NFS submit
directory are not excluded by it (the lock file names the holder's host to make that visible).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from batchprod.errors import RunError

LOCK_FILE = "engine.lock"
PROBE_GRACE = 0.25  # seconds an engine keeps trying before it believes someone else holds the run

#: submit dir -> descriptor of a lock this process holds (taken here or inherited from a detaching parent)
_held: dict[str, int] = {}


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        text = []
    pid = text[0] if text else "?"
    host = text[1] if len(text) > 1 else "?"
    return f"pid {pid} on host {host}"


def acquire(submit_dir: str | Path, name: str | None = None) -> int:
    """Take the run's lock without waiting; RunError naming the holder if another process has it."""
    key = str(Path(submit_dir).resolve())
    if key in _held:
        return _held[key]
    path = Path(key) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + PROBE_GRACE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # a reader probing with is_free() holds it for microseconds: only a holder that stays is real
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            os.close(fd)
            raise RunError(f"run '{name or key}' is being driven by {_holder(path)}; "
                           "wait for it, or stop it with 'batchprod cancel'") from None
    _stamp(fd)
    _held[key] = fd
    return fd


def _stamp(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def holder_pid(submit_dir: str | Path) -> int | None:
    """Pid written by the process that holds (or last held) the run's lock."""
    try:
        return int((Path(submit_dir) / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_free(submit_dir: str | Path) -> bool:
    """True if nobody holds the run's lock now (probed by taking and dropping it)."""
    key = str(Path(submit_dir).resolve())
    if key in _held:
        return False
    try:
        fd = os.open(Path(key) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def adopt(submit_dir: str | Path, fd: int) -> None:
    """Register a lock descriptor inherited from the parent that took it (``--detach``). It is made
    close-on-exec again: a job process that outlived its engine must not keep the run locked."""
    os.set_inheritable(fd, False)
    _held[str(Path(submit_dir).resolve())] = fd
    _stamp(fd)


def release(submit_dir: str | Path) -> None:
    fd = _held.pop(str(Path(submit_dir).resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def forget(submit_dir: str | Path) -> None:
    """Close this process's descriptor without unlocking (the lock now lives in a child we forked)."""
    fd = _held.pop(str(Path(submit_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def run_lock(submit_dir: str | Path, name: str | None = None) -> Iterator[None]:
    """Hold the run's lock for the block; a lock this process already held stays held after it."""
    key = str(Path(submit_dir).resolve())
    mine = key not in _held
    acquire(key, name)
    try:
        yield
    finally:
        if mine:
            release(key)
