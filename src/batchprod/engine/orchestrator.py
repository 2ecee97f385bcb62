"""The orchestrator: one run on one site, the case ``batchprod submit`` and ``restart`` use.

It is the dispatcher (``engine/dispatcher.py``) with one RunDag (``engine/dag.py``) and one site,
plus what a run's engine owns: the run lock (taken before recovery looks at anything), recovery
after an engine's death, signals (SIGTERM/SIGINT cancel the run), a full disk under the state store,
and the post-run ingest into the data registry.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from batchprod.engine.dag import Progress, RunDag, classify
from batchprod.engine.dispatcher import Clock, Dispatcher, Site
from batchprod.engine.ingest import ingest_outputs
from batchprod.engine.lock import run_lock
from batchprod.errors import RunError
from batchprod.execution.process import process_start
from batchprod.execution.states import FailureClass, RunState
from batchprod.state.run import Run
from batchprod.wms.base import Backend

__all__ = ["INGEST_FAILED", "Orchestrator", "Progress", "classify", "disk_trouble"]

INGEST_FAILED = "outputs not ingested into the registry"  # the run's message when post-run ingest failed

_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only filesystem"}


def disk_trouble(exc: BaseException, state_dir: Path) -> str | None:
    """'disk full at PATH' (or quota / read-only) if the error is one, else None. SQLite reports a
    full disk as an OperationalError of its own: that is the state store, in the submit directory."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return f"{_DISK_ERRNOS[exc.errno]} at {exc.filename or state_dir}"
    text = str(getattr(exc, "orig", exc)).lower()
    if "disk is full" in text or "disk full" in text:
        return f"disk full at {state_dir}"
    if "readonly database" in text or "read-only" in text:
        return f"read-only filesystem at {state_dir}"
    return None


class Orchestrator:
    """Runs (or resumes) one prepared run through a backend."""

    def __init__(
        self,
        run: Run,
        backend: Backend,
        cores: int | None = None,
        memory_mb: int | None = None,
        progress: Progress | None = None,
        poll: float = 0.005,
        clock: Clock | None = None,
    ) -> None:
        self.run = run
        self.backend = backend
        self.clock = clock or Clock()
        self.host = socket.gethostname()
        # the site is named as the run's config names it (computeSite), not after its kind of backend
        self.site = Site.of(str(run.config.get("computeSite") or backend.name), backend, cores, memory_mb)
        self.dag = RunDag(run, progress, self.host, self.clock.time, self.clock.monotonic)
        self.dispatcher = Dispatcher([self.site], self.clock, poll)
        self.dispatcher.on_site = self._on_site
        self._stop: str | None = None

    def execute(self) -> RunState:
        # one engine per run: the lock is taken before recovery looks at anything, held to the end
        with run_lock(self.run.submit_dir, self.run.name):
            return self._execute()

    def _execute(self) -> RunState:
        store = self.run.store
        self.dag.load()
        self.dag.recover([self.backend])
        me = os.getpid()
        store.set_run(status=RunState.RUNNING, orchestrator_pid=me, orchestrator_host=self.host,
                      orchestrator_start=process_start(me))
        session = store.begin_execution(self.host, me)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.dag.prepare_queue()
            self.dispatcher.add(self.dag)
            results = self.dispatcher.run(lambda: self._stop)
            state = results[self.dag.key]
        except (OSError, DBAPIError) as exc:
            where = disk_trouble(exc, self.run.submit_dir)
            if where is None:
                raise
            self._stop_on_disk_trouble()
            raise RunError(f"{where}: the run stopped cleanly; free space (or make it writable) and "
                           f"'batchprod restart {self.run.submit_dir}' (nothing is lost)") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.backend.close()
        message = self._ingest()
        store.end_execution(session)
        store.set_run(status=state, orchestrator_pid=None, message=message)
        return state

    def _stop_on_disk_trouble(self) -> None:
        """Disk full or read-only under the engine: stop every attempt (they would fail for the same
        reason) and record what can still be recorded. What cannot is repaired by restart's recovery,
        which treats the attempts as abandoned by a lost engine: their budget is kept."""
        self.backend.kill_many([a.handle for a in self.dag.active.values()], FailureClass.INFRASTRUCTURE,
                               "stopped: the engine cannot write its state (disk full or read-only)")
        with contextlib.suppress(OSError, DBAPIError):
            self.backend.escalate(0.0)
            self.run.store.set_run(status=RunState.INTERRUPTED, orchestrator_pid=None,
                                   message="stopped: disk full or read-only; restart when there is room")

    def _ingest(self) -> str | None:
        """Post-run: published outputs into the data registry. A failure here loses nothing (the state
        store has every output; the next execute or restart ingests again) and is reported, not raised."""
        try:
            n = ingest_outputs(self.run)
        except Exception as exc:  # noqa: BLE001 (any registry trouble: report it on the run, keep the result)
            return f"{INGEST_FAILED}: {exc}"
        return f"{n} outputs in the registry" if n else None

    def _on_site(self, site: Site, reason: str | None) -> None:
        """Say on the run (report, runs, dashboard) that its site does not answer, and since when:
        the engine waits for it (attempts kept), it has not hung."""
        from datetime import datetime

        if reason is None:
            self.run.store.set_run(message=None)
            return
        since = datetime.fromtimestamp(self.clock.time()).astimezone().isoformat(timespec="seconds")
        self.run.store.set_run(message=f"site '{site.name}' not answering since {since}: {reason} "
                                       "(attempts kept; asked again every few seconds)")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name

    # views used by tests and progress displays
    def counts(self) -> dict[str, int]:
        return self.dag.counts()

    def label_counts(self) -> dict[str, dict[str, int]]:
        return self.dag.label_counts()
