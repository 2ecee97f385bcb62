"""Process helpers shared by the executor, cancel and report."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists and is not a zombie (a killed process whose parent
    has not reaped it — common in containers whose PID 1 never reaps — is dead for us)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group (a job and everything it started); gone groups are ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: what a cancel must leave empty."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) == pgid:
                out.append(p.info["pid"])
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out
