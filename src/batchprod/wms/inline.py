"""The job wrapper's pre- and post-job steps for jobs that are plain shell scripts.

Every backend runs a job made only of shell commands without a Python wrapper process (which costs
more CPU than the job itself for short jobs); the orchestrator does these steps around it instead,
on the shared filesystem, exactly as the Python wrapper would on the node. Also here: what every
backend gives a job (its variables) and, for backends whose jobs run elsewhere, the wrapper's spec
file and the usage file it writes back.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from batchprod.execution.commands import shell_script
from batchprod.execution.protocol import (
    EXIT_INFRASTRUCTURE,
    StageError,
    stage_in_check,
    staging_map,
    write_fence,
)
from batchprod.wms.base import Ended, Launch

ENV_SUBMIT_DIR = "BATCHPROD_SUBMIT_DIR"


def job_variables(launch: Launch) -> dict[str, str]:
    """Variables every attempt gets: they mark it as its run's (``launch.run``, so a restart finds
    orphans by environment) and tell the payload its attempt and core count."""
    return {"BATCHPROD_JOB": launch.name, "BATCHPROD_ATTEMPT": str(launch.attempt),
            ENV_SUBMIT_DIR: launch.run, "OMP_NUM_THREADS": str(launch.cores)}


def write_wrapper_spec(launch: Launch, **extra: Any) -> str:
    """Write the job wrapper's spec next to the attempt's result (for a wrapper started elsewhere,
    which enforces its memory request and reports its usage back); returns the file's path."""
    spec = dict(launch.spec, enforce_memory=True, usage_path=f"{launch.result}.usage.json", **extra)
    path = str(launch.result).replace(".result.json", ".spec.json")
    with open(path, "w") as fh:
        fh.write(json.dumps(spec))
    return path


def wrapper_usage(launch: Launch) -> dict[str, Any]:
    """What the wrapper of ``write_wrapper_spec`` reported (resource use, host, context); {} if none."""
    try:
        with open(f"{launch.result}.usage.json") as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return {}


#: storage errors that every attempt would meet: raised to the engine, which stops the run cleanly
#: (restartable, no retry budget spent) rather than failing attempts one by one
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def engine_disk_trouble(exc: BaseException) -> None:
    """Re-raise a full or read-only disk met while starting an attempt (see DISK_ERRNOS); any
    other error is the attempt's own (an early ``infrastructure`` end)."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        raise exc


class InlineJobs:
    """What a backend keeps for shell-script jobs: the staging directories it made, and attempts that
    failed their stage-in check (they end as ``infrastructure`` without ever starting)."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host
        self.dirs: set[str] = set()
        self.early: list[Ended] = []

    def plan(self, launch: Launch) -> tuple[str | None, dict[str, str], bool]:
        """(shell script or None if the job needs the Python wrapper, staging map, started-ok).
        Fences off the job's earlier attempts (:func:`write_fence`: one still running can no longer
        publish) and does the pre-job step: a missing input, or storage that cannot take the
        staging directories, records an early ``infrastructure`` end and returns False, and the
        caller must not start the attempt."""
        staged = staging_map(launch.spec)
        script = shell_script(launch.spec, staged)
        try:
            write_fence(launch.result, launch.attempt)
            if script is None:
                return None, staged, True
            stage_in_check(launch.spec)
            for d in {os.path.dirname(v) for v in staged.values()} - self.dirs:
                os.makedirs(d, exist_ok=True)
                self.dirs.add(d)
        except (StageError, OSError) as exc:
            engine_disk_trouble(exc)
            self.fail_early(launch, str(exc) if isinstance(exc, StageError)
                            else f"stage-in: cannot prepare the attempt: {exc}")
            return script, staged, False
        return script, staged, True

    def fail_early(self, launch: Launch, message: str) -> None:
        """End an attempt that cannot start as ``infrastructure`` (its logs say why, if they can)."""
        reason = None
        try:
            launch.stderr.write_text(f"error: {message}\n")
            launch.stdout.write_text("")
        except OSError:
            reason = f"infrastructure: {message}"  # no log to read it from
        self.early.append(launch.ended(EXIT_INFRASTRUCTURE, None, reason=reason, host=self.host))

    def take_early(self) -> list[Ended]:
        out, self.early = self.early, []
        return out
