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


def process_start(pid: int) -> float | None:
    """Create time of a process (None if gone): with the pid it identifies one process for good."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def same_process_alive(pid: int | None, start: float | None) -> bool:
    """Is the process we recorded (pid + create time) still alive? A reused pid does not count."""
    if not pid or not pid_alive(pid):
        return False
    if start is None:
        return True
    now_start = process_start(pid)
    return now_start is not None and abs(now_start - start) < 1.0


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value: finds a run's job processes even when the
    orchestrator died before it could record their pids."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(name) == value:
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def kill_group_of(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the whole process group a process belongs to (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        kill_group(os.getpgid(pid), sig)


def tree_usage(proc: psutil.Process) -> tuple[float, float]:
    """Resident memory (MB) and CPU seconds so far of a process and all its descendants. The CPU of
    a descendant that ended is in its parent's children times once reaped; of one killed with its
    tree before anyone reaped it (a payload killed over its memory request), only a sample taken while
    it ran knows it. Raises psutil.NoSuchProcess if the process itself is gone."""
    rss, cpu = 0, 0.0
    for i, p in enumerate([proc, *proc.children(recursive=True)]):
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
        except psutil.NoSuchProcess:
            if i == 0:
                raise
            continue
        cpu += t.user + t.system + t.children_user + t.children_system
    return rss / 2**20, cpu


def tree_rss_mb(proc: psutil.Process) -> float:
    """Resident memory of a process and all its descendants, in MB (what a memory request limits).
    Raises psutil.NoSuchProcess if the process itself is gone."""
    rss = proc.memory_info().rss
    for c in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += c.memory_info().rss
    return rss / 2**20
