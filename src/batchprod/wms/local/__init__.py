"""The embedded local WMS: the default backend."""

from __future__ import annotations

import os
import signal
import time

from batchprod.errors import RunError
from batchprod.execution.process import kill_group, pid_alive, same_process_alive
from batchprod.execution.run import Run
from batchprod.execution.states import JobState, RunState
from batchprod.wms.base import BaseWmsService, Progress
from batchprod.wms.local.backend import LocalBackend
from batchprod.wms.orchestrator import Orchestrator


def LocalExecutor(run: Run, **kwargs: object) -> Orchestrator:  # noqa: N802 (reads like the class it builds)
    """The orchestrator driving local processes: the embedded default."""
    return Orchestrator(run, LocalBackend(str(run.submit_dir)), **kwargs)  # type: ignore[arg-type]


class LocalService(BaseWmsService):
    """Runs every job as a process on this machine, within a cores + memory budget."""

    name = "local"

    def execute(self, run: Run, progress: Progress | None = None) -> RunState:
        return LocalExecutor(run, progress=progress).execute()

    def cancel(self, run: Run, timeout: float = 30.0) -> None:
        info = run.store.run_info()
        pid = info.get("orchestrator_pid")
        if same_process_alive(pid, info.get("orchestrator_start")):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if run.store.run_info()["status"] != RunState.RUNNING:
                    return
                time.sleep(0.1)
            raise RunError(f"run '{info['name']}': orchestrator {pid} did not stop within {timeout:.0f}s")
        # The orchestrator is gone: stop whatever job processes it left and mark the run.
        now = time.time()
        jobs, attempts = [], []
        for a in run.store.attempts(status=JobState.RUNNING):
            if a["pid"] and pid_alive(a["pid"]):
                kill_group(a["pid"], signal.SIGKILL)
            attempts.append({**a, "status": JobState.CANCELLED, "failure_class": "cancelled", "end": now,
                             "message": "cancelled (orchestrator not running)"})
        for j in run.store.jobs(status=[JobState.PENDING, JobState.READY, JobState.QUEUED, JobState.RUNNING]):
            jobs.append({**j, "status": JobState.CANCELLED, "message": "run cancelled", "updated": now})
        run.store.write(jobs, attempts)
        run.store.set_run(status=RunState.CANCELLED, orchestrator_pid=None)


__all__ = ["LocalBackend", "LocalExecutor", "LocalService"]
