"""The job wrapper's pre- and post-job steps for jobs that are plain shell scripts.

Every backend runs a job made only of shell commands without a Python wrapper process (which costs
more CPU than the job itself for short jobs); the orchestrator does these steps around it instead,
on the shared filesystem, exactly as the Python wrapper would on the node.
"""

from __future__ import annotations

import os
import time
from typing import Any

from batchprod.execution.runner import (
    EXIT_INFRASTRUCTURE,
    EXIT_MISSING_OUTPUT,
    MissingOutput,
    StageError,
    collect_outputs,
    finish_attempt,
    shell_script,
    stage_in_check,
    staging_map,
)
from batchprod.wms.base import Ended, Launch


class InlineJobs:
    """What a backend keeps for shell-script jobs: the staging directories it made, and attempts that
    failed their stage-in check (they end as ``infrastructure`` without ever starting)."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host
        self.dirs: set[str] = set()
        self.early: list[Ended] = []

    def plan(self, launch: Launch) -> tuple[str | None, dict[str, str], bool]:
        """(shell script or None if the job needs the Python wrapper, staging map, started-ok).
        Does the pre-job step: a missing input records an early ``infrastructure`` end and returns
        False, and the caller must not start the attempt."""
        staged = staging_map(launch.spec)
        script = shell_script(launch.spec, staged)
        if script is None:
            return None, staged, True
        try:
            stage_in_check(launch.spec)
        except StageError as exc:
            launch.stderr.write_text(f"error: {exc}\n")
            launch.stdout.write_text("")
            self.early.append(Ended(launch.job, launch.attempt, EXIT_INFRASTRUCTURE, None, host=self.host))
            return script, staged, False
        for d in {os.path.dirname(v) for v in staged.values()} - self.dirs:
            os.makedirs(d, exist_ok=True)
            self.dirs.add(d)
        return script, staged, True

    def take_early(self) -> list[Ended]:
        out, self.early = self.early, []
        return out


def inline_post_job(launch: Launch, staged: dict[str, str], started: float) -> tuple[int, list[dict[str, Any]] | None]:
    """Post-job of a shell-script job, done by the orchestrator: outputs checked, checksummed, the
    manifest written and the outputs published, as the Python wrapper does on a node. Returns the
    exit code the attempt ends with and its outputs."""
    spec = launch.spec
    try:
        outputs = [o for q in spec["quanta"] for o in collect_outputs(q, staged)]
        # durable=False: the state store commits with synchronous=NORMAL too; a process kill keeps
        # both, only a power loss could lose the last few
        finish_attempt(spec, outputs, time.time() - started, durable=False)
    except MissingOutput as exc:
        _append_err(launch, f"error: {exc}")
        return EXIT_MISSING_OUTPUT, None
    except (StageError, OSError) as exc:
        _append_err(launch, f"error: {exc}")
        return EXIT_INFRASTRUCTURE, None
    return 0, outputs


def _append_err(launch: Launch, line: str) -> None:
    with open(launch.stderr, "a") as fh:
        fh.write(line + "\n")
