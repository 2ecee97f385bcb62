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
    stage_in_check,
)
from batchprod.wms.base import Launch


def inline_pre_job(launch: Launch, staged: dict[str, str], known_dirs: set[str]) -> str | None:
    """Stage-in check and staging directories for a job run as a plain shell script; returns the
    error line if an input is missing (the attempt then ends as ``infrastructure`` without starting)."""
    try:
        stage_in_check(launch.spec)
    except StageError as exc:
        return f"error: {exc}"
    for d in {os.path.dirname(v) for v in staged.values()} - known_dirs:
        os.makedirs(d, exist_ok=True)
        known_dirs.add(d)
    return None


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
