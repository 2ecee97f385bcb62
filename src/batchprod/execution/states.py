"""Job states and failure classes: one enum each, in one file, shared by every backend."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"  # waiting for parents
    READY = "READY"  # parents done, waiting for resources
    QUEUED = "QUEUED"  # handed to the WMS
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # failed for good (retries exhausted or not retryable)
    KILLED = "KILLED"
    CANCELLED = "CANCELLED"
    UNREADY = "UNREADY"  # an upstream job failed for good
    HELD = "HELD"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


_TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.KILLED, JobState.CANCELLED, JobState.UNREADY}
)


class FailureClass(StrEnum):
    """Why an attempt ended badly; decides whether and how it is retried."""

    USER_ERROR = "user_error"  # payload exited non-zero
    OOM = "oom"  # over its memory request
    KILLED = "killed"  # signal from outside, preemption, node loss
    TIMEOUT = "timeout"  # past requestWalltime
    INFRASTRUCTURE = "infrastructure"  # stage-in/out, site down
    CANCELLED = "cancelled"  # the operator cancelled the run


class RunState(StrEnum):
    PREPARED = "PREPARED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # finished, some jobs failed
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # orchestrator gone while the run was RUNNING
