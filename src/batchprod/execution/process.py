"""Process helpers shared by the executor, cancel and report."""

from __future__ import annotations

import contextlib
import os
import signal


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists (zombies count as gone only once reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group (a job and everything it started); gone groups are ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
