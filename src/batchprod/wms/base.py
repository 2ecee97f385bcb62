"""The WMS plugin interface: a small abstract class; implementations register as entry points.

A WMS runs a prepared run (its generic workflow) and can cancel it. Status, report and restart read
the run's state store, which every backend keeps up to date, so they are not the plugin's business.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchprod.errors import BatchprodError, RunError
from batchprod.execution.states import FailureClass

if TYPE_CHECKING:
    from batchprod.state.run import Run



class BaseWmsService(ABC):
    """One workload management system (local processes, Slurm, Parsl, ...).

    A service supplies a :class:`Backend` for a run; running, cancelling and restarting are the
    same for every service (the orchestrator and the state store do them)."""

    name: str = "base"

    @abstractmethod
    def backend(self, run: Run) -> Backend:
        """The backend that starts, polls and kills this run's attempts."""

    def site_backend(self, settings: Any) -> Backend:
        """A backend for a site of a site catalog, from that site's typed settings (this plugin's
        ``settings_model``): it serves attempts of any run."""
        raise NotImplementedError(f"WMS '{self.name}' cannot serve as a catalog site")

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        """Stop what a dead orchestrator left running (used by cancel)."""
        backend = self.backend(run)
        try:
            backend.cleanup_orphans(run, handles)
        finally:
            backend.close()

@dataclass(eq=False)
class Launch:
    """One attempt the engine wants started. ``(run, job, attempt)`` is its key: a backend serves
    attempts of any run. The wrapper's input (``spec``) is built only when a backend asks for it
    (building it for every job was ~30 % of the engine's CPU, and a fake or a scheduler with its own
    per-group submit file never needs it)."""

    job: int
    name: str
    label: str
    attempt: int
    cores: int
    memory: int  # MB
    walltime: int  # seconds, 0 = none
    make_spec: Callable[[], dict[str, Any]] | dict[str, Any]  # the job wrapper's input, or how to build it
    out: str | Path  # its stdout file (``stdout``, as a Path, is made only if asked for: ~2.6 µs each)
    err: str | Path  # its stderr file
    res: str | Path  # its result manifest
    run: str = ""  # the run's submit directory: whose attempt this is
    disk: int = 0  # MB of scratch disk asked (ctrl_bps requestDisk), 0 = none

    @cached_property
    def spec(self) -> dict[str, Any]:
        return self.make_spec() if callable(self.make_spec) else self.make_spec

    @cached_property
    def stdout(self) -> Path:
        return Path(self.out)

    @cached_property
    def stderr(self) -> Path:
        return Path(self.err)

    @cached_property
    def result(self) -> Path:
        return Path(self.res)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.run, self.job, self.attempt

    def ended(self, exit_code: int | None, signal: int | None, **fields: Any) -> Ended:
        """This attempt's end, keyed like it."""
        return Ended(self.job, self.attempt, exit_code, signal, run=self.run, **fields)


@dataclass(frozen=True)
class Capacity:
    """What a site can take at once. The engine never places more on it; None = no limit of that kind
    (cores and memory: for the local site, this machine's)."""

    cores: int | None = None
    memory_mb: int | None = None
    max_jobs: int | None = None  # attempts started and not yet ended (running + queued at the site)
    max_queued: int | None = None  # of which waiting in the site's queue (late binding: strands little)


class SiteUnavailable(BatchprodError):
    """The site's scheduler cannot be reached (squeue fails, the executor is gone): nothing can be
    known about its attempts now. Not a job failure: the engine keeps its attempts and asks again."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site '{site}' unavailable: {reason}")
        self.site = site
        self.reason = reason


class SubmitRefused(RunError):
    """The site's scheduler answered but refused the submission (a bad partition or account, no
    client installed). Alone, a run cannot go on (the operator must fix the site: one clear line);
    among several sites it is evidence against this one ("submissions fail repeatedly")."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site '{site}': submission refused: {reason}")
        self.site = site
        self.reason = reason


@dataclass
class Ended:
    """One attempt that ended, as the backend saw it. ``fclass`` is set when the backend knows the
    cause (it killed the job for memory, the scheduler timed it out or lost the node); otherwise the
    orchestrator derives it from the wrapper's exit code / signal."""

    job: int
    attempt: int
    exit_code: int | None
    signal: int | None
    fclass: FailureClass | None = None
    reason: str | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    host: str | None = None
    outputs: list[dict[str, Any]] | None = None  # when the backend did post-job itself (else read the manifest)
    context: str | None = None  # provenance context hash reported by the job wrapper (else the orchestrator's)
    context_record: dict[str, Any] | None = None
    run: str = ""  # the run's submit directory (see Launch.key)
    #: set when the payload ended well and post-job is the engine's (a shell-script job run without the
    #: Python wrapper): what it staged, and when it started; the run's job protocol publishes it
    staged: dict[str, str] | None = None
    started: float | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return self.run, self.job, self.attempt

    @classmethod
    def from_usage(cls, launch: Launch, code: int | None, sig: int | None, usage: dict[str, Any],
                   fclass: FailureClass | None = None, reason: str | None = None,
                   host: str | None = None) -> Ended:
        """An end with what the job wrapper measured and recorded (its usage file; may be empty)."""
        return cls(launch.job, launch.attempt, code, sig, fclass, reason, usage.get("peak_rss_mb"),
                   usage.get("cpu_s"), usage.get("host") or host, None, usage.get("context"),
                   usage.get("context_record"), launch.run)


class Backend(ABC):
    """How attempts start, end and are stopped on one kind of resource (a Parsl-style provider).

    The orchestrator keeps the DAG, priorities, retry policy and the state store; a backend only
    launches, reports what ended (in one bulk call per poll) and kills."""

    name: str = "backend"

    @abstractmethod
    def start(self, launches: Sequence[Launch]) -> list[str]:
        """Start attempts; returns one handle (pid, scheduler job id) per launch."""

    @abstractmethod
    def poll(self) -> list[Ended]:
        """Every attempt that ended since the last poll (one scheduler query, never one per job)."""

    @abstractmethod
    def kill(self, handle: str, fclass: FailureClass, reason: str) -> None:
        """Stop one attempt; its Ended carries ``fclass`` and ``reason``."""

    def kill_many(self, handles: Sequence[str], fclass: FailureClass, reason: str) -> None:
        """Stop many attempts (cancel); batch systems override this with one bulk call."""
        for h in handles:
            self.kill(h, fclass, reason)

    @abstractmethod
    def active(self) -> int:
        """Attempts started and not yet reported ended."""

    def wait(self, timeout: float) -> None:
        """Block until an attempt may have ended or ``timeout`` seconds passed (the orchestrator calls
        this when it has nothing else to do). Backends that can be woken by an end override it."""
        time.sleep(timeout)

    def running_since(self, handle: str) -> float | None:
        """Wall-clock time the attempt started executing (not queued); None if it has not yet.
        Walltime is counted from here, so time spent in a batch queue is not held against a job."""
        return None

    def capacity(self) -> Capacity:
        """What this site takes at once (the one place that says it: the engine never exceeds it)."""
        return Capacity()

    def queued(self) -> int:
        """Attempts started here that wait in the site's queue (not yet running)."""
        return 0

    @abstractmethod
    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        """After an orchestrator loss: make sure no attempt of the run is still executing."""

    def escalate(self, grace: float) -> None:  # noqa: B027 (optional hook)
        """During cancel: hard-stop attempts that ignored a polite stop for ``grace`` seconds."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources at the end of a run."""
