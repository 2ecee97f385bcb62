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
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from batchprod._gc import settle
from batchprod._time import iso
from batchprod.engine.dag import Progress, RunDag, classify
from batchprod.engine.dispatcher import Clock, Dispatcher, Site
from batchprod.engine.health import HealthPolicy
from batchprod.engine.ingest import ingest_outputs
from batchprod.engine.lock import run_lock
from batchprod.errors import RunError
from batchprod.execution.process import process_start
from batchprod.execution.states import FailureClass, RunState
from batchprod.state.run import Run
from batchprod.wms.base import Backend

__all__ = ["INGEST_FAILED", "Engine", "Orchestrator", "Progress", "classify", "disk_trouble"]

INGEST_FAILED = "outputs not ingested into the registry"  # the run's message when post-run ingest failed

#: what writing the state can raise: the OS, SQLAlchemy, and the sqlite3 module the store's batched
#: writes use directly (a full disk there is sqlite3's OperationalError, neither of the others)
STATE_WRITE_ERRORS = (OSError, DBAPIError, sqlite3.Error)

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
    """Drives several prepared runs to their end on several sites, in one dispatcher loop. Runs can
    be given all at once (:meth:`execute`) or joined and retired one by one (:meth:`open_run`,
    :meth:`close_run`: what the campaign dispatcher does as steps start and end)."""

    def __init__(self, sites: Sequence[Site], clock: Clock | None = None, poll: float = 0.005,
                 policy: HealthPolicy | None = None) -> None:
        self.sites = list(sites)
        self.clock = clock or Clock()
        self.host = socket.gethostname()
        self.dispatcher = Dispatcher(self.sites, self.clock, poll, policy=policy)
        self.dispatcher.on_site = self._on_site
        self.dags: list[RunDag] = []
        self._stop: str | None = None
        self._locks: dict[str, contextlib.ExitStack] = {}
        self._sessions: dict[str, int] = {}

    def execute(self, runs: Sequence[Run], progress: Progress | None = None) -> dict[str, RunState]:
        """Every run to its end; returns each run's state by its key (submit directory). A run driven
        by another engine is refused before anything is touched (RunError naming it)."""
        try:
            for run in runs:  # one engine per run: locks first, before recovery looks at anything
                self.lock_run(run)
            return self._execute(runs, progress)
        finally:
            self.release_all()

    def lock_run(self, run: Run) -> None:
        """Take the run's lock (held until :meth:`close_run`): RunError if another engine drives it."""
        stack = contextlib.ExitStack()
        stack.enter_context(run_lock(run.submit_dir, run.name))
        self._locks[str(run.submit_dir)] = stack

    def release_all(self) -> None:
        for stack in self._locks.values():
            stack.close()
        self._locks.clear()

    def open_run(self, run: Run, progress: Progress | None = None) -> RunDag:
        """Join a run to the loop: lock (if not yet held), recovery of what a lost engine left, the run
        marked RUNNING in a new execution session, its ready set; returns its DAG for the caller to
        set priority, share, group and sites on."""
        if str(run.submit_dir) not in self._locks:
            self.lock_run(run)
        me = os.getpid()
        dag = RunDag(run, progress, self.host, self.clock.time, self.clock.monotonic)
        dag.load()
        dag.recover([s.backend for s in self.sites])
        run.store.set_run(status=RunState.RUNNING, orchestrator_pid=me, orchestrator_host=self.host,
                          orchestrator_start=process_start(me))
        self._sessions[dag.key] = run.store.begin_execution(self.host, me)
        self.dags.append(dag)
        dag.prepare_queue()
        self.dispatcher.add(dag)
        settle()  # (in an engine loop: the run's graph, workflow and states are long-lived)
        return dag

    def close_run(self, run: Run, state: RunState) -> str | None:
        """After the dispatcher retired the run: ingest its outputs, end its session, record its
        state, release its lock. Returns the run's message."""
        key = str(run.submit_dir)
        message = self._ingest(run) if state != RunState.CANCELLED else None
        session = self._sessions.pop(key, None)
        if session is not None:
            run.store.end_execution(session)
        run.store.set_run(status=state, orchestrator_pid=None, message=message)
        self.dags = [d for d in self.dags if d.key != key]
        stack = self._locks.pop(key, None)
        if stack is not None:
            stack.close()
        return message

    def _execute(self, runs: Sequence[Run], progress: Progress | None) -> dict[str, RunState]:
        for run in runs:
            self.open_run(run, progress)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            results = self.dispatcher.run(lambda: self._stop)
        except STATE_WRITE_ERRORS as exc:
            self.disk_stop(exc, runs)
            raise  # (disk_stop raises RunError when it is the disk)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.close_backends()
        for run in runs:
            self.close_run(run, results[str(run.submit_dir)])
        return results

    def disk_stop(self, exc: BaseException, runs: Sequence[Run]) -> None:
        """A full or read-only disk under the engine: stop cleanly and raise RunError saying what to do;
        any other error: return (the caller re-raises it)."""
        where = disk_trouble(exc, runs[0].submit_dir if runs else Path("."))
        if where is None:
            return
        self._stop_on_disk_trouble()
        again = " ".join(f"'batchprod restart {r.submit_dir}'" for r in runs)
        raise RunError(f"{where}: the run stopped cleanly; free space (or make it writable) and "
                       f"{again} (nothing is lost)") from None

    def close_backends(self) -> None:
        for s in self.sites:
            s.backend.close()

    def _stop_on_disk_trouble(self) -> None:
        """Disk full or read-only under the engine: stop every attempt (they would fail for the same
        reason) and record what can still be recorded. What cannot is repaired by restart's recovery,
        which treats the attempts as abandoned by a lost engine: their budget is kept."""
        for site in self.sites:
            handles = [a.handle for dag in self.dags for a in dag.active.values() if a.site == site.name]
            site.backend.kill_many(handles, FailureClass.INFRASTRUCTURE,
                                   "stopped: the engine cannot write its state (disk full or read-only)")
            with contextlib.suppress(*STATE_WRITE_ERRORS):
                site.backend.escalate(0.0)
        for dag in self.dags:
            with contextlib.suppress(*STATE_WRITE_ERRORS):
                dag.run.store.set_run(status=RunState.INTERRUPTED, orchestrator_pid=None,
                                      message="stopped: disk full or read-only; restart when there is room")

    @staticmethod
    def _ingest(run: Run) -> str | None:
        """Post-run: published outputs into the data registry. A failure here loses nothing (the state
        store has every output; the next execute or restart ingests again) and is reported, not raised.
        A Rubin run's outputs are the Butler's own (its final job, aggregate-graph, registers them)."""
        if run.workflow.run.get("protocol") == "butler":
            return None
        try:
            n = ingest_outputs(run)
        except Exception as exc:  # noqa: BLE001 (any registry trouble: report it on the run, keep the result)
            said = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
            return f"{INGEST_FAILED}: {said[0]} (restart ingests again; nothing is lost)"
        return f"{n} outputs in the registry" if n else None

    def _on_site(self, site: Site, reason: str | None) -> None:
        """Say on the runs (report, runs, dashboard) that a site does not answer, and since when: the
        engine waits for it (attempts kept), it has not hung."""
        if reason is None:
            message = None
        else:
            since = iso(self.clock.time())
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
