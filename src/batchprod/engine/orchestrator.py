"""The orchestrator: batchprod keeps the DAG itself (like DAGMan) and drives a backend.

It holds the DAG in arrays (remaining-parent counts, a ready heap ordered by priority), applies the
retry policy, enforces walltime, keeps the state store, and recovers after its own death. A backend
(local processes, Slurm, ...) only starts attempts, reports in one bulk poll which ended, and kills.

Crash safety: an attempt is committed to the state store *before* its process starts, and every
state change before it (a parent's success, say) is committed in the same transaction. Completed
work is also committed on the compute side (the runner's ``result.json``), so a restart after a
``kill -9`` adopts what finished and re-runs only what did not.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from batchprod.engine.ingest import ingest_outputs
from batchprod.engine.lock import run_lock
from batchprod.errors import RunError
from batchprod.execution.capture import context_hash, context_record
from batchprod.execution.logs import batchprod_line, causal_line
from batchprod.execution.policy import JobCounters, decide
from batchprod.execution.process import process_start
from batchprod.execution.protocol import (
    EXIT_INFRASTRUCTURE,
    EXIT_MEMORY_ERROR,
    KILL_SIGNALS,
    StageError,
    commit_outputs,
    complete_after_loss,
)
from batchprod.execution.states import FailureClass, JobState, RunState
from batchprod.graph.registry import canonical
from batchprod.state.run import Run
from batchprod.wms.base import Backend, Ended, Launch
from batchprod.workflow.generic import FinalJob, Resources

#: progress callback: jobs per state, and jobs per state for each task label
Progress = Callable[[dict[str, int], dict[str, dict[str, int]]], None]

INGEST_FAILED = "outputs not ingested into the registry"  # the run's message when post-run ingest failed
FLUSH_INTERVAL = 0.25  # seconds between state commits
KILL_GRACE = 3.0  # seconds between the polite and the hard stop on cancel


@dataclass
class _Active:
    job: int
    attempt: int
    handle: str
    start: float
    cores: int
    memory: int
    launch: Launch
    killing: bool = False


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


def classify(exit_code: int | None, sig: int | None) -> FailureClass | None:
    """Failure class of an ended attempt from the wrapper's exit code or signal (None = success)."""
    if sig is not None:
        return FailureClass.KILLED if sig in KILL_SIGNALS else FailureClass.USER_ERROR
    if exit_code == 0:
        return None
    if exit_code == EXIT_MEMORY_ERROR:
        return FailureClass.OOM
    if exit_code == EXIT_INFRASTRUCTURE:
        return FailureClass.INFRASTRUCTURE
    return FailureClass.USER_ERROR


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
    ) -> None:
        self.run = run
        self.backend = backend
        self.wf = run.workflow
        cap = backend.capacity()
        self.cores = cores or cap.cores or 1 << 30
        self.memory = memory_mb or cap.memory_mb or 1 << 40
        self.max_jobs = cap.max_jobs or 1 << 62
        self.max_queued = cap.max_queued or 1 << 62
        self.progress = progress
        self.poll = poll
        self.host = socket.gethostname()
        self._stop: str | None = None
        self._ran = False  # a job (not the final one) was launched in this execution
        self._final_again = False
        n = len(self.wf)
        self.n = n
        self.final_id = n if self.wf.final is not None else None
        self.group_res: list[Resources] = [g.resources for g in self.wf.groups]
        self.job_group = self.wf.job_group.tolist()
        ptr, idx = self.wf.children_csr()
        self.child_ptr, self.child_idx = ptr.tolist(), idx.tolist()
        self.label = [self.wf.groups[g].name for g in self.job_group]
        self._names: dict[int, str] = {}
        self._dirty: set[int] = set()
        self._attempt_rows: list[dict[str, Any]] = []
        self._output_rows: list[dict[str, Any]] = []
        self.active: dict[int, _Active] = {}  # job -> active attempt
        self.delayed: list[tuple[float, int]] = []  # (not before, job): back-off
        self.heap: list[tuple[int, int]] = []
        self.used_cores = 0
        self.used_memory = 0
        self.submit_key = str(run.submit_dir)
        self._log_dirs: set[str] = set()
        # provenance: the context (host, software, environment) attempts run in unless their wrapper
        # reports its own; recorded once, attempts point to it by hash
        modules = [t.python for t in self.wf.qgraph.tasks] + [self.wf.final.python if self.wf.final else None]
        record = context_record(m.partition(":")[0] for m in modules if m)
        self.context = context_hash(record)
        self._contexts: dict[str, dict[str, Any]] = {self.context: record}
        self._known_contexts: set[str] = set()

    # -- helpers ------------------------------------------------------------------------------------
    def name(self, j: int) -> str:
        if j == self.final_id:
            return FinalJob.NAME
        if j not in self._names:
            self._names[j] = self.wf.job_name(j)
        return self._names[j]

    def job_label(self, j: int) -> str:
        return FinalJob.NAME if j == self.final_id else self.label[j]

    def resources(self, j: int) -> Resources:
        if j == self.final_id:
            assert self.wf.final is not None
            return self.wf.final.resources
        return self.group_res[self.job_group[j]]

    def log_paths(self, j: int, attempt: int) -> tuple[Path, Path, Path]:
        return self.run.attempt_paths(self.job_label(j), self.name(j), attempt)

    def _set(self, j: int, state: JobState, **fields: Any) -> None:
        old = self.status[j]
        if old != state:
            lab = self.job_label(j)
            self._tally[(lab, old)] -= 1
            self._tally[(lab, state)] += 1
        self.status[j] = state
        self.extra[j].update(fields)
        self._dirty.add(j)

    # -- state and recovery -------------------------------------------------------------------------
    def _load_state(self) -> None:
        """Arrays from the store. Unfinished jobs get a fresh budget (submit and restart alike); what
        they learned (attempt count, raised memory) is kept."""
        rows = self.run.store.job_columns("id", "status", "attempts", "request_memory")
        total = self.n + (1 if self.final_id is not None else 0)
        if len(rows) != total:
            raise RunError(f"{self.run.submit_dir}: damaged run: the state store has {len(rows):,} jobs, "
                           f"the workflow {total:,}")
        self.status = [JobState(r[1]) for r in rows]
        # (label, state) -> jobs, kept up to date by _set: progress never rescans 10^6 jobs
        self._tally: Counter[tuple[str, JobState]] = Counter(
            (self.job_label(j), s) for j, s in enumerate(self.status))
        self.attempts = [int(r[2]) for r in rows]
        self.req_mem = [int(r[3]) for r in rows]
        self.counters = [JobCounters() for _ in rows]
        self.extra: list[dict[str, Any]] = [{} for _ in rows]
        for j, s in enumerate(self.status):
            if s in (JobState.FAILED, JobState.UNREADY, JobState.CANCELLED, JobState.KILLED, JobState.HELD):
                self._set(j, JobState.PENDING, message="reset by restart", failure_class=None, exit_code=None)
            if s != JobState.SUCCEEDED:
                # learned memory is kept, but a request raised since (restart -o) is honoured
                self.req_mem[j] = max(self.req_mem[j], self.resources(j).request_memory)

    def _recover(self) -> int:
        """After an orchestrator loss: stop orphaned attempts, adopt those that completed, and queue
        the rest again without spending their budget. Returns how many jobs were recovered."""
        active = [j for j, s in enumerate(self.status) if s in (JobState.RUNNING, JobState.QUEUED, JobState.READY)]
        # the last attempt of a job the store shows active is the one still marked QUEUED/RUNNING
        last = {a["job_id"]: a for a in self.run.store.attempts(status=[JobState.QUEUED, JobState.RUNNING])}
        self.backend.cleanup_orphans(self.run, [str(a["handle"]) for a in last.values() if a.get("handle")])
        if not active:
            return 0
        now = time.time()
        for j in active:
            a = last.get(j)
            if self.status[j] == JobState.READY or a is None:
                self._set(j, JobState.PENDING)
                continue
            result = self.log_paths(j, a["number"])[2]
            if not result.exists() and Path(f"{result}.pending").exists():
                with contextlib.suppress(StageError, OSError, ValueError):
                    commit_outputs(result)  # roll a half-done publication forward
            if not result.exists() and Path(f"{result}.exit").exists():
                spec = self._spec(j)
                spec.update(result_path=str(result), attempt=a["number"])
                complete_after_loss(spec)  # its commands finished; do the post-job it missed
            row = {**a, "end": a.get("end") or now}
            if result.exists():
                self._record_outputs(j, result)
                row.update(status=JobState.SUCCEEDED, exit_code=0,
                           message="completed while the orchestrator was down; adopted")
                self._attempt_rows.append(row)
                self._set(j, JobState.SUCCEEDED, exit_code=0, failure_class=None, message=row["message"])
            else:
                row.update(status=JobState.FAILED, failure_class=FailureClass.KILLED,
                           message="orchestrator lost; attempt abandoned (budget kept)")
                self._attempt_rows.append(row)
                self._set(j, JobState.PENDING, failure_class=FailureClass.KILLED, message=row["message"])
        return len(active)

    # -- main loop ----------------------------------------------------------------------------------
    def execute(self) -> RunState:
        # one engine per run: the lock is taken before recovery looks at anything, held to the end
        with run_lock(self.run.submit_dir, self.run.name):
            return self._execute()

    def _execute(self) -> RunState:
        self._load_state()
        store = self.run.store
        self._recover()
        me = os.getpid()
        store.set_run(status=RunState.RUNNING, orchestrator_pid=me, orchestrator_host=self.host,
                      orchestrator_start=process_start(me))
        session = store.begin_execution(self.host, me)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            state = self._loop()
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
        self._flush()
        message = self._ingest()
        store.end_execution(session)
        store.set_run(status=state, orchestrator_pid=None, message=message)
        return state

    def _stop_on_disk_trouble(self) -> None:
        """Disk full or read-only under the engine: stop every attempt (they would fail for the same
        reason) and record what can still be recorded. What cannot is repaired by restart's recovery,
        which treats the attempts as abandoned by a lost engine: their budget is kept."""
        self.backend.kill_many([a.handle for a in self.active.values()], FailureClass.INFRASTRUCTURE,
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

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name

    def prepare_queue(self) -> None:
        """Remaining-parent counts and the ready heap from the loaded states; one commit."""
        n = self.n
        self.remaining = [0] * n
        for j in range(n):
            if self.status[j] != JobState.SUCCEEDED:
                for c in self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]]:
                    self.remaining[c] += 1
        for j in range(n):
            if self.status[j] == JobState.PENDING and self.remaining[j] == 0:
                self._push(j)
        self._flush()

    def _loop(self) -> RunState:
        n = self.n
        self.prepare_queue()
        last_flush = 0.0
        while True:
            if self._stop:
                self._cancel_all()
                return RunState.CANCELLED
            now = time.monotonic()
            while self.delayed and self.delayed[0][0] <= now:
                self._push(heapq.heappop(self.delayed)[1])
            launched = self._launch_ready()
            ended = self.backend.poll() if self.active else []
            for e in ended:
                self._finish(e)
            self._check_walltime()
            if now - last_flush > FLUSH_INTERVAL:
                self._flush()
                last_flush = now
            if not self.active and not self.heap and not self.delayed:
                if self._final_due():
                    assert self.final_id is not None and self.wf.final is not None
                    all_ok = all(s == JobState.SUCCEEDED for s in self.status[:n])
                    if self.wf.final.when_run == "ALWAYS" or all_ok:
                        self._rerun_final()
                        self._push(self.final_id)
                        continue
                    self._set(self.final_id, JobState.UNREADY, message="not run: whenRun=SUCCESS and some jobs failed")
                break
            if not launched and not ended:
                self.backend.wait(self.poll)
        ok = all(s == JobState.SUCCEEDED for s in self.status)
        return RunState.SUCCEEDED if ok else RunState.FAILED

    def _final_due(self) -> bool:
        """Like HTCondor's FINAL node: the final job runs at the end of every execution in which any
        job ran, so its product reflects the run's final state, not the first partial one."""
        if self.final_id is None:
            return False
        s = self.status[self.final_id]
        return s == JobState.PENDING or (s == JobState.SUCCEEDED and self._ran and not self._final_again)

    def _rerun_final(self) -> None:
        assert self.final_id is not None
        self._final_again = True  # once per execution
        if self.status[self.final_id] != JobState.SUCCEEDED:
            return
        self._set(self.final_id, JobState.PENDING, message="runs again: jobs ran since its last run")
        self._flush()  # durable before its old outputs are forgotten: a crash now re-runs it on restart
        self.run.store.drop_outputs(self.final_id)

    def _push(self, j: int) -> None:
        heapq.heappush(self.heap, (-self.resources(j).priority, j))
        if self.status[j] != JobState.READY:
            self._set(j, JobState.READY)

    def _launch_ready(self) -> int:
        batch: list[Launch] = []
        room = min(self.max_jobs - len(self.active), self.max_queued - self.backend.queued())
        while self.heap and room > 0:
            room -= 1
            _, j = self.heap[0]
            res = self.resources(j)
            mem = self.req_mem[j]
            cores = min(res.request_cpus, self.cores)
            fits = self.used_cores + cores <= self.cores and self.used_memory + mem <= self.memory
            # Strict priority: wait for room rather than let smaller jobs jump ahead. A job bigger than
            # the whole budget (prepare rejects those when the site sets one) runs alone, not never.
            if not fits and (self.active or batch):
                break
            heapq.heappop(self.heap)
            attempt = self.attempts[j] + 1
            self.attempts[j] = attempt
            out, err, result = self.log_paths(j, attempt)
            spec = functools.partial(self._launch_spec, j, attempt, mem, result)  # built if a backend asks
            launch = Launch(j, self.name(j), self.job_label(j), attempt, cores, mem, res.request_walltime, spec,
                            out, err, result, self.submit_key)
            self._set(j, JobState.QUEUED, message=None)
            self._attempt_rows.append({
                "job_id": j, "number": attempt, "status": JobState.QUEUED, "request_memory": mem,
                "start": time.time(), "stdout": str(out), "stderr": str(err),
            })
            self.used_cores += cores
            self.used_memory += mem
            batch.append(launch)
        if not batch:
            return 0
        self._ran = self._ran or any(b.job != self.final_id for b in batch)
        self._flush()  # the attempts (and everything before them) are durable before any of them starts
        for launch in batch:
            if launch.label not in self._log_dirs:
                launch.stdout.parent.mkdir(parents=True, exist_ok=True)
                self._log_dirs.add(launch.label)
        handles = self.backend.start(batch)
        now = time.time()
        for launch, handle in zip(batch, handles, strict=True):
            j = launch.job
            self.active[j] = _Active(j, launch.attempt, handle, now, launch.cores, launch.memory, launch)
            self._set(j, JobState.RUNNING)
            self._attempt_rows.append({
                "job_id": j, "number": launch.attempt, "status": JobState.RUNNING, "request_memory": launch.memory,
                "handle": handle, "pid": int(handle) if handle.isdigit() else None, "start": now,
                "stdout": str(launch.stdout), "stderr": str(launch.stderr),
            })
        return len(batch)

    def _launch_spec(self, j: int, attempt: int, mem: int, result: Path) -> dict[str, Any]:
        spec = self._spec(j)
        spec.update(result_path=str(result), attempt=attempt, memory_mb=mem)
        return spec

    def _spec(self, j: int) -> dict[str, Any]:
        if j == self.final_id:
            spec = self.wf.final_spec()
            assert spec is not None
            spec["submit_dir"] = str(self.run.submit_dir)
            return spec
        return self.wf.job_spec(j)

    def _check_walltime(self) -> None:
        if not self.active:
            return
        now = time.time()
        for a in self.active.values():
            wall = a.launch.walltime
            if not wall or a.killing:
                continue
            since = self.backend.running_since(a.handle)
            if since is not None and now - since > wall:
                a.killing = True
                self.backend.kill(a.handle, FailureClass.TIMEOUT, f"timeout: past requestWalltime {wall}s")

    def _finish(self, e: Ended) -> None:
        a = self.active.pop(e.job, None)
        if a is None or a.attempt != e.attempt:
            return  # a stale report (e.g. of an attempt abandoned at recovery)
        j = e.job
        self.used_cores -= a.cores
        self.used_memory -= a.memory
        end = time.time()
        fclass = e.fclass if e.fclass is not None else classify(e.exit_code, e.signal)
        reason = e.reason
        if fclass is None and not a.launch.result.exists():
            fclass, reason = FailureClass.USER_ERROR, "exit 0 without a committed result manifest"
        row: dict[str, Any] = {
            "job_id": j, "number": a.attempt, "request_memory": a.memory, "host": e.host or self.host,
            "handle": a.handle, "pid": int(a.handle) if a.handle.isdigit() else None,
            "start": a.start, "end": end, "wall_s": end - a.start, "stdout": str(a.launch.stdout),
            "stderr": str(a.launch.stderr), "exit_code": e.exit_code, "signal": e.signal, "failure_class": fclass,
            "peak_rss_mb": e.peak_rss_mb, "cpu_s": e.cpu_s, "context": e.context or self.context,
        }
        if e.context and e.context_record and e.context not in self._known_contexts:
            self._contexts[e.context] = e.context_record
        if fclass is None:
            row["status"] = JobState.SUCCEEDED
            self._attempt_rows.append(row)
            if e.outputs is not None:
                self._add_outputs(j, e.outputs)
            else:
                self._record_outputs(j, a.launch.result)
            self._set(j, JobState.SUCCEEDED, exit_code=0, failure_class=None, message=None)
            if j != self.final_id:
                for c in self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]]:
                    self.remaining[c] -= 1
                    if self.remaining[c] == 0 and self.status[c] == JobState.PENDING:
                        self._push(c)
            return
        what = reason or (f"{fclass}: killed by {signal.Signals(e.signal).name}" if e.signal
                          else f"{fclass}: exit code {e.exit_code}")
        row.update(status=JobState.CANCELLED if fclass == FailureClass.CANCELLED else JobState.FAILED,
                   message=what, error_line=self._cause(fclass, a.launch, what, reason))
        self._attempt_rows.append(row)
        if fclass == FailureClass.CANCELLED:
            self._set(j, JobState.CANCELLED, failure_class=fclass, exit_code=e.exit_code, message=what)
            return
        d = decide(fclass, self.resources(j), self.counters[j], self.req_mem[j], self.memory)
        self.req_mem[j] = d.memory
        if d.retry and not self._stop:
            self._set(j, JobState.PENDING, failure_class=fclass, exit_code=e.exit_code, message=f"{what}; {d.reason}")
            if d.delay > 0:
                heapq.heappush(self.delayed, (time.monotonic() + d.delay, j))
            else:
                self._push(j)
            return
        self._set(j, JobState.FAILED, failure_class=fclass, exit_code=e.exit_code, message=f"{what}; {d.reason}")
        self._mark_unready(j)

    @staticmethod
    def _cause(fclass: FailureClass, launch: Launch, what: str, reason: str | None) -> str:
        """The line an operator acts on. A payload error: what the payload said (its last meaningful
        line, a traceback's final exception). Anything done to it from outside (oom, timeout, kill,
        stage-in/out): batchprod's own account, which the payload cannot know."""
        if fclass == FailureClass.USER_ERROR:
            return causal_line(launch.stderr, launch.stdout) or batchprod_line(launch.stderr) or what
        if reason:  # the backend or the engine knows why (it killed the job for memory or walltime, ...)
            return reason
        if fclass == FailureClass.OOM:  # e.g. the payload's own MemoryError
            return batchprod_line(launch.stderr) or causal_line(launch.stderr) or what
        if fclass == FailureClass.INFRASTRUCTURE:
            return batchprod_line(launch.stderr) or what
        return what

    def _mark_unready(self, j: int) -> None:
        if j == self.final_id:
            return
        stack = list(self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]])
        while stack:
            c = stack.pop()
            if self.status[c] in (JobState.PENDING, JobState.READY):
                self._set(c, JobState.UNREADY, message=f"upstream job {self.name(j)} failed")
                stack.extend(self.child_idx[self.child_ptr[c] : self.child_ptr[c + 1]])

    def _record_outputs(self, j: int, result: Path) -> None:
        try:
            manifest = json.loads(result.read_text())
        except (OSError, ValueError):
            return
        self._add_outputs(j, manifest.get("outputs", []))

    def _add_outputs(self, j: int, outputs: list[dict[str, Any]]) -> None:
        for o in outputs:
            self._output_rows.append({
                "job_id": j, "node_id": o["node_id"], "dataset_type": o["dataset_type"],
                "data_id": canonical(o["data_id"]), "path": o["path"],
                "size": o.get("size"), "checksum": o.get("checksum"),
            })

    def _cancel_all(self) -> None:
        reason = f"cancelled ({self._stop})"
        self.backend.kill_many([a.handle for a in self.active.values()], FailureClass.CANCELLED, reason)
        deadline = time.monotonic() + KILL_GRACE + 30
        while self.active and time.monotonic() < deadline:
            self.backend.escalate(KILL_GRACE)
            ended = self.backend.poll()
            for e in ended:
                # an attempt that raced to success keeps it; anything else ends as cancelled
                if e.fclass is None and classify(e.exit_code, e.signal) is not None:
                    e.fclass, e.reason = FailureClass.CANCELLED, reason
                self._finish(e)
            if not ended:
                time.sleep(0.02)
        for j, s in enumerate(self.status):
            if s in (JobState.PENDING, JobState.READY, JobState.QUEUED, JobState.RUNNING):
                self._set(j, JobState.CANCELLED, message=f"run {reason}")
        self.heap.clear()
        self.delayed.clear()

    # -- state --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, state), n in self._tally.items():
            out[str(state)] += n
        return {k: v for k, v in out.items() if v}

    def label_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (label, state), n in self._tally.items():
            if n:
                out.setdefault(label, {})[str(state)] = n
        return out

    def _flush(self) -> None:
        now = time.time()
        jobs = []
        for j in sorted(self._dirty):
            c, e = self.counters[j], self.extra[j]
            jobs.append({
                "id": j, "status": self.status[j], "attempts": self.attempts[j], "retries": c.retries,
                "preemptions": c.preemptions, "infra_failures": c.infra, "request_memory": self.req_mem[j],
                "failure_class": e.get("failure_class"), "exit_code": e.get("exit_code"),
                "message": e.get("message"), "updated": now,
            })
        self.run.store.write(jobs, self._attempt_rows, self._output_rows, self._contexts)
        self._known_contexts.update(self._contexts)
        self._contexts = {}
        self._dirty.clear()
        self._attempt_rows = []
        self._output_rows = []
        if self.progress:
            self.progress(self.counts(), self.label_counts())
