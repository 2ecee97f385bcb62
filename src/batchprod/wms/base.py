"""The WMS plugin interface: a small abstract class; implementations register as entry points.

A WMS runs a prepared run (its generic workflow) and can cancel it. Status, report and restart read
the run's state store, which every backend keeps up to date, so they are not the plugin's business.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchprod.errors import ConfigError
from batchprod.execution.states import FailureClass

if TYPE_CHECKING:
    from batchprod.execution.run import Run
    from batchprod.execution.states import RunState

#: progress callback: jobs per state, and jobs per state for each task label
Progress = Callable[[dict[str, int], dict[str, dict[str, int]]], None]


class BaseWmsService(ABC):
    """One workload management system (local processes, Slurm, Parsl, ...).

    A service supplies a :class:`Backend` for a run; running, cancelling and restarting are the
    same for every service (the orchestrator and the state store do them)."""

    name: str = "base"

    @abstractmethod
    def backend(self, run: Run) -> Backend:
        """The backend that starts, polls and kills this run's attempts."""

    def budget(self, run: Run) -> tuple[int | None, int | None]:
        """(cores, memory MB) the orchestrator may use at once; None = the site's or this machine's."""
        return None, None

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        """Stop what a dead orchestrator left running (used by cancel)."""
        backend = self.backend(run)
        try:
            backend.cleanup_orphans(run, handles)
        finally:
            backend.close()

    def execute(self, run: Run, progress: Progress | None = None) -> RunState:
        """Run every not-yet-succeeded job of the run to completion, in the foreground."""
        from batchprod.wms.orchestrator import Orchestrator

        cores, memory = self.budget(run)
        return Orchestrator(run, self.backend(run), cores=cores, memory_mb=memory, progress=progress).execute()

    def cancel(self, run: Run, timeout: float = 60.0) -> str:
        """Stop every running job of the run and mark it CANCELLED; the run stays restartable.
        Returns what was done, in words (a finished run is left as it is)."""
        import time

        from batchprod.errors import RunError
        from batchprod.execution import lock
        from batchprod.execution.states import JobState, RunState

        info = run.store.run_info()
        try:
            lock.acquire(run.submit_dir, run.name)
        except RunError:
            # an engine drives the run: it stops its jobs and records it
            pid = lock.holder_pid(run.submit_dir)
            if pid is None:
                raise
            _terminate(pid)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if lock.is_free(run.submit_dir):
                    return f"cancelled {info['name']} (engine pid {pid} stopped its jobs)"
                now_pid = lock.holder_pid(run.submit_dir)
                if now_pid is not None and now_pid != pid:  # a detached engine took over from its parent
                    pid = now_pid
                    _terminate(pid)
                time.sleep(0.1)
            raise RunError(f"run '{info['name']}': engine pid {pid} did not stop within {timeout:.0f}s") from None
        try:
            if info["status"] in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED):
                return f"nothing to cancel: run {info['name']} is {info['status']} (changed nothing)"
            # No engine: stop whatever a dead one left running and mark the run.
            now = time.time()
            active = run.store.attempts(status=[JobState.QUEUED, JobState.RUNNING])
            self.cleanup_orphans(run, [str(a["handle"]) for a in active if a.get("handle")])
            attempts = [{**a, "status": JobState.CANCELLED, "failure_class": "cancelled", "end": now,
                         "message": "cancelled (orchestrator not running)"} for a in active]
            jobs = [{**j, "status": JobState.CANCELLED, "message": "run cancelled", "updated": now}
                    for j in run.store.jobs(status=[JobState.PENDING, JobState.READY, JobState.QUEUED,
                                                    JobState.RUNNING])]
            run.store.write(jobs, attempts)
            run.store.set_run(status=RunState.CANCELLED, orchestrator_pid=None)
        finally:
            lock.release(run.submit_dir)
        n = len(active)
        return f"cancelled {info['name']} ({n} orphaned attempt{'s' if n != 1 else ''} stopped)"


def _terminate(pid: int) -> None:
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def get_wms(name: str) -> BaseWmsService:
    """A WMS by entry-point name (``local``) or ``module:Class``; anything that is not a concrete
    BaseWmsService (``os:system``, a module that raises on import) is a one-line ConfigError."""
    import inspect

    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        try:
            cls: Any = getattr(importlib.import_module(mod), attr)
        except BaseException as exc:  # noqa: BLE001 (a user's module may raise anything, even SystemExit)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise ConfigError(f"wmsServiceClass '{name}': cannot load: {type(exc).__name__}: {exc}") from None
    else:
        eps = {ep.name: ep for ep in entry_points(group="batchprod.wms")}
        if name not in eps:
            raise ConfigError(f"wmsServiceClass '{name}': unknown WMS (installed: {', '.join(sorted(eps))})")
        try:
            cls = eps[name].load()
        except Exception as exc:  # noqa: BLE001 (a broken plugin install)
            raise ConfigError(f"wmsServiceClass '{name}': plugin cannot load: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseWmsService)) or inspect.isabstract(cls):
        raise ConfigError(f"wmsServiceClass '{name}' is not a WMS service class "
                          "(expected a subclass of batchprod.wms.base.BaseWmsService)")
    return cls()


@dataclass
class Launch:
    """One attempt the orchestrator wants started."""

    job: int
    name: str
    label: str
    attempt: int
    cores: int
    memory: int  # MB
    walltime: int  # seconds, 0 = none
    spec: dict[str, Any]  # the job wrapper's input (JSON-serializable)
    stdout: Path
    stderr: Path
    result: Path


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

    @classmethod
    def from_usage(cls, job: int, attempt: int, code: int | None, sig: int | None, usage: dict[str, Any],
                   fclass: FailureClass | None = None, reason: str | None = None,
                   host: str | None = None) -> Ended:
        """An end with what the job wrapper measured and recorded (its usage file; may be empty)."""
        return cls(job, attempt, code, sig, fclass, reason, usage.get("peak_rss_mb"), usage.get("cpu_s"),
                   usage.get("host") or host, None, usage.get("context"), usage.get("context_record"))


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

    def can_start(self) -> bool:
        """Throttle (e.g. maxJobs/maxIdle on a batch system); the local budget is the orchestrator's."""
        return True

    @abstractmethod
    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        """After an orchestrator loss: make sure no attempt of the run is still executing."""

    def escalate(self, grace: float) -> None:  # noqa: B027 (optional hook)
        """During cancel: hard-stop attempts that ignored a polite stop for ``grace`` seconds."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources at the end of a run."""
