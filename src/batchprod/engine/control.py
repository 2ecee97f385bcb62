"""Running and cancelling a run: the same for every WMS (the engine and the state store do them)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from batchprod.engine import lock
from batchprod.engine.orchestrator import Orchestrator, Progress
from batchprod.errors import RunError
from batchprod.execution.states import JobState, RunState
from batchprod.state.run import Run
from batchprod.wms.base import BaseWmsService
from batchprod.wms.local import LocalService


def LocalExecutor(run: Run, **kwargs: object) -> Orchestrator:  # noqa: N802 (reads like the class it builds)
    """The orchestrator driving local processes: the embedded default."""
    return Orchestrator(run, LocalService().backend(run), **kwargs)  # type: ignore[arg-type]


def execute(service: BaseWmsService, run: Run, progress: Progress | None = None) -> RunState:
    """Run every not-yet-succeeded job of the run to completion, in the foreground."""
    return Orchestrator(run, service.backend(run), progress=progress).execute()


def cancel(service: BaseWmsService, run: Run, timeout: float = 60.0) -> str:
    """Stop every running job of the run and mark it CANCELLED; the run stays restartable.
    Returns what was done, in words (a finished run is left as it is)."""
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
        service.cleanup_orphans(run, [str(a["handle"]) for a in active if a.get("handle")])
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
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
