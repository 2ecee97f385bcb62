"""The engine process: several runs on several sites, and the orchestrator, its one-run one-site case
(what ``batchprod submit`` and ``restart`` use).

:class:`Engine` is the dispatcher (``engine/dispatcher.py``) over one RunDag (``engine/dag.py``) per
run, plus what a run's engine owns: each run's lock (taken before recovery looks at anything, held to
the end), recovery after an engine's death, signals (SIGTERM/SIGINT cancel every run), a full disk
under a state store, the run's status and execution sessions, and the post-run ingest into the data
registry.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from collections.abc import Sequence
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

__all__ = ["INGEST_FAILED", "Engine", "Orchestrator", "Progress", "classify", "disk_trouble"]

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


class Engine:
    """Drives several prepared runs to their end on several sites, in one dispatcher loop."""

    def __init__(self, sites: Sequence[Site], clock: Clock | None = None, poll: float = 0.005) -> None:
        self.sites = list(sites)
        self.clock = clock or Clock()
        self.host = socket.gethostname()
        self.dispatcher = Dispatcher(self.sites, self.clock, poll)
        self.dispatcher.on_site = self._on_site
        self.dags: list[RunDag] = []
        self._stop: str | None = None

    def execute(self, runs: Sequence[Run], progress: Progress | None = None) -> dict[str, RunState]:
        """Every run to its end; returns each run's state by its key (submit directory). A run driven
        by another engine is refused before anything is touched (RunError naming it)."""
        with contextlib.ExitStack() as locks:
            for run in runs:  # one engine per run: locks first, before recovery looks at anything
                locks.enter_context(run_lock(run.submit_dir, run.name))
            return self._execute(runs, progress)

    def _execute(self, runs: Sequence[Run], progress: Progress | None) -> dict[str, RunState]:
        me = os.getpid()
        backends = [s.backend for s in self.sites]
        sessions = []
        for run in runs:
            dag = RunDag(run, progress, self.host, self.clock.time, self.clock.monotonic)
            dag.load()
            dag.recover(backends)
            run.store.set_run(status=RunState.RUNNING, orchestrator_pid=me, orchestrator_host=self.host,
                              orchestrator_start=process_start(me))
            sessions.append(run.store.begin_execution(self.host, me))
            self.dags.append(dag)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for dag in self.dags:
                dag.prepare_queue()
                self.dispatcher.add(dag)
            results = self.dispatcher.run(lambda: self._stop)
        except (OSError, DBAPIError) as exc:
            where = disk_trouble(exc, runs[0].submit_dir)
            if where is None:
                raise
            self._stop_on_disk_trouble()
            again = " ".join(f"'batchprod restart {r.submit_dir}'" for r in runs)
            raise RunError(f"{where}: the run stopped cleanly; free space (or make it writable) and "
                           f"{again} (nothing is lost)") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for b in backends:
                b.close()
        for run, session in zip(runs, sessions, strict=True):
            message = self._ingest(run)
            run.store.end_execution(session)
            run.store.set_run(status=results[str(run.submit_dir)], orchestrator_pid=None, message=message)
        return results

    def _stop_on_disk_trouble(self) -> None:
        """Disk full or read-only under the engine: stop every attempt (they would fail for the same
        reason) and record what can still be recorded. What cannot is repaired by restart's recovery,
        which treats the attempts as abandoned by a lost engine: their budget is kept."""
        for site in self.sites:
            handles = [a.handle for dag in self.dags for a in dag.active.values() if a.site == site.name]
            site.backend.kill_many(handles, FailureClass.INFRASTRUCTURE,
                                   "stopped: the engine cannot write its state (disk full or read-only)")
            with contextlib.suppress(OSError, DBAPIError):
                site.backend.escalate(0.0)
        for dag in self.dags:
            with contextlib.suppress(OSError, DBAPIError):
                dag.run.store.set_run(status=RunState.INTERRUPTED, orchestrator_pid=None,
                                      message="stopped: disk full or read-only; restart when there is room")

    @staticmethod
    def _ingest(run: Run) -> str | None:
        """Post-run: published outputs into the data registry. A failure here loses nothing (the state
        store has every output; the next execute or restart ingests again) and is reported, not raised."""
        try:
            n = ingest_outputs(run)
        except Exception as exc:  # noqa: BLE001 (any registry trouble: report it on the run, keep the result)
            return f"{INGEST_FAILED}: {exc}"
        return f"{n} outputs in the registry" if n else None

    def _on_site(self, site: Site, reason: str | None) -> None:
        """Say on the runs (report, runs, dashboard) that a site does not answer, and since when: the
        engine waits for it (attempts kept), it has not hung."""
        from datetime import datetime

        if reason is None:
            message = None
        else:
            since = datetime.fromtimestamp(self.clock.time()).astimezone().isoformat(timespec="seconds")
            message = (f"site '{site.name}' not answering since {since}: {reason} "
                       "(attempts kept; asked again every few seconds)")
        for dag in self.dispatcher.dags:
            dag.run.store.set_run(message=message)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name


class Orchestrator(Engine):
    """One run on one site (``batchprod submit``, ``restart``, a detached ``_execute``)."""

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
        # the site is named as the run's config names it (computeSite), not after its kind of backend
        site = Site.of(str(run.config.get("computeSite") or backend.name), backend, cores, memory_mb)
        super().__init__([site], clock, poll)
        self.run = run
        self.backend = backend
        self.progress = progress

    def execute(self) -> RunState:  # type: ignore[override]
        return super().execute([self.run], self.progress)[str(self.run.submit_dir)]

    @property
    def dag(self) -> RunDag:
        return self.dags[0]

    # views used by tests and progress displays
    def counts(self) -> dict[str, int]:
        return self.dag.counts()

    def label_counts(self) -> dict[str, dict[str, int]]:
        return self.dag.label_counts()
