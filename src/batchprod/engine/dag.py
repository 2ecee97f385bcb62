"""RunDag: one run's DAG state machine. It knows jobs, dependencies, retries and the state store;
it knows nothing of sites (the dispatcher places its ready attempts).

It holds the DAG in arrays (remaining-parent counts, a ready heap ordered by priority), applies the
retry policy, keeps the state store, and recovers after an engine's death.

Crash safety: an attempt is committed to the state store *before* its process starts, and every
state change before it (a parent's success, say) is committed in the same transaction. Completed
work is also committed on the compute side (the job protocol's manifest), so a restart after a
``kill -9`` adopts what finished and re-runs only what did not.
"""

from __future__ import annotations

import functools
import heapq
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchprod.errors import RunError
from batchprod.execution.base import JobProtocol
from batchprod.execution.butler import ButlerJobs
from batchprod.execution.capture import context_hash, context_record
from batchprod.execution.logs import batchprod_line, causal_line
from batchprod.execution.policy import JobCounters, decide
from batchprod.execution.protocol import EXIT_INFRASTRUCTURE, EXIT_MEMORY_ERROR, KILL_SIGNALS, NativeFiles
from batchprod.execution.states import FailureClass, JobState, RunState
from batchprod.graph.registry import canonical
from batchprod.state.run import Run
from batchprod.wms.base import Backend, Ended, Launch
from batchprod.workflow.generic import FinalJob, Resources

#: progress callback: jobs per state, and jobs per state for each task label
Progress = Callable[[dict[str, int], dict[str, dict[str, int]]], None]


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


@dataclass
class Active:
    """An attempt started and not yet ended: where it runs and what it holds there."""

    job: int
    attempt: int
    handle: str
    start: float
    cores: int
    memory: int
    launch: Launch
    site: str = ""
    killing: bool = False


#: a payload's causal line that says the disk refused its writes (errno ENOSPC, EDQUOT, EROFS)
_DISK_ERROR = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system")


class RunDag:
    """One run's jobs: what is ready, what runs, what retries, and its state store."""

    def __init__(self, run: Run, progress: Progress | None = None, host: str = "",
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self.run = run
        self.key = str(run.submit_dir)  # Launch.run / Ended.run
        self.wf = run.workflow
        self.protocol: JobProtocol = ButlerJobs() if self.wf.run.get("protocol") == "butler" else NativeFiles()
        self.progress = progress
        self.host = host
        self.wall, self.mono = wall, mono
        self.stopping: str | None = None  # why the run is being cancelled (no retries from then)
        self.priority = 0  # the run's (its campaign's): a run of higher priority is served first
        self.share = 1.0  # its group's fair-share target among groups of equal priority (relative)
        self.group = self.key  # fair-share group: the run's campaign (alone: the run itself)
        self.paused = False  # no new attempts (its campaign is paused); those running go on
        self.sites: frozenset[str] | None = None  # sites it may use (a campaign step's pins), None: any
        self.on_site_down = "hold"  # or "redispatch": its work in flight on a site declared down
        self.held = 0  # cores its attempts hold on sites (taken and not ended): fair share without a scan
        #: attempt rows are kept for the store (a simulated run's store discards them: none are built)
        self.record = not getattr(run.store, "discards", False)
        self._ran = False  # a job (not the final one) was launched in this execution
        self._final_again = False
        n = len(self.wf)
        self.n = n
        self.final_id = n if self.wf.final is not None else None
        self.group_res: list[Resources] = [g.resources for g in self.wf.groups]
        #: some job has a walltime (else the dispatcher never scans this run's attempts for one)
        self.has_walltime = any(r.request_walltime for r in self.group_res) or self.wf.job_walltime is not None or bool(
            self.wf.final is not None and self.wf.final.resources.request_walltime)
        self.job_group = self.wf.job_group.tolist()
        ptr, idx = self.wf.children_csr()
        self.child_ptr, self.child_idx = ptr.tolist(), idx.tolist()
        self.label = [self.wf.groups[g].name for g in self.job_group]
        self._names: dict[int, str] = {}
        self._dirty: set[int] = set()
        self._attempt_rows: list[dict[str, Any]] = []
        self._output_rows: list[dict[str, Any]] = []
        self.active: dict[int, Active] = {}  # job -> active attempt
        self.delayed: list[tuple[float, int]] = []  # (not before, job): back-off
        self.heap: list[tuple[int, int]] = []
        self._log_dirs: set[str] = set()
        self._log_root = str(run.log_dir)
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

    def walltime(self, j: int) -> int:
        """Seconds the job may run (0: no limit): its own when its cluster sums its quanta's (ctrl_bps)."""
        w = self.wf.job_walltime
        if w is not None and j != self.final_id and w[j]:
            return int(w[j])
        return self.resources(j).request_walltime

    def disk(self, j: int) -> int:
        """MB of scratch disk the job asks for (its own when its cluster sums its quanta's, as ctrl_bps)."""
        d = self.wf.job_disk
        if d is not None and j != self.final_id and d[j]:
            return int(d[j])
        return self.resources(j).request_disk

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
    def load(self) -> None:
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
        #: job -> the site its last attempt was killed on or lost to (infrastructure): its retry goes
        #: elsewhere while another site can take it (few jobs at a time: a dict, not an array)
        self.shun: dict[int, str] = {}
        for j, s in enumerate(self.status):
            if s in (JobState.FAILED, JobState.UNREADY, JobState.CANCELLED, JobState.KILLED, JobState.HELD):
                self._set(j, JobState.PENDING, message="reset by restart", failure_class=None, exit_code=None)
            if s != JobState.SUCCEEDED:
                # learned memory is kept, but a request raised since (restart -o) is honoured
                self.req_mem[j] = max(self.req_mem[j], self.resources(j).request_memory)

    def recover(self, sites: Sequence[Backend]) -> int:
        """After an engine loss: stop orphaned attempts (on every site the run may have used), adopt
        those that completed, and queue the rest again without spending their budget. Returns how
        many jobs were recovered."""
        active = [j for j, s in enumerate(self.status) if s in (JobState.RUNNING, JobState.QUEUED, JobState.READY)]
        # the last attempt of a job the store shows active is the one still marked QUEUED/RUNNING
        last = {a["job_id"]: a for a in self.run.store.attempts(status=[JobState.QUEUED, JobState.RUNNING])}
        handles = [str(a["handle"]) for a in last.values() if a.get("handle")]
        for site in sites:
            site.cleanup_orphans(self.run, handles)
        if not active:
            return 0
        now = self.wall()
        for j in active:
            a = last.get(j)
            if self.status[j] == JobState.READY or a is None:
                self._set(j, JobState.PENDING)
                continue
            result = self.log_paths(j, a["number"])[2]
            row = {**a, "end": a.get("end") or now}
            spec = functools.partial(self._launch_spec, j, a["number"], self.req_mem[j], result)
            outputs = self.protocol.recover(result, spec)
            if outputs is not None:
                self._add_outputs(j, outputs)
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
                self.push(j)
        self.flush()

    # -- the ready set ------------------------------------------------------------------------------
    def push(self, j: int) -> None:
        heapq.heappush(self.heap, (-self.resources(j).priority, j))
        if self.status[j] != JobState.READY:
            self._set(j, JobState.READY)

    def promote(self, now: float) -> None:
        """Jobs whose back-off is over become ready again."""
        while self.delayed and self.delayed[0][0] <= now:
            self.push(heapq.heappop(self.delayed)[1])

    def idle(self) -> bool:
        """Nothing runs, nothing is ready or waiting: the run is over unless its final job is due."""
        return not self.active and not self.heap and not self.delayed

    def finish_or_final(self) -> bool:
        """Called when idle: queue the final job if due (False: not finished yet), else True."""
        if self._final_due():
            assert self.final_id is not None and self.wf.final is not None
            all_ok = all(s == JobState.SUCCEEDED for s in self.status[: self.n])
            if self.wf.final.when_run == "ALWAYS" or all_ok:
                self._rerun_final()
                self.push(self.final_id)
                return False
            self._set(self.final_id, JobState.UNREADY, message="not run: whenRun=SUCCESS and some jobs failed")
        return True

    def outcome(self) -> RunState:
        return RunState.SUCCEEDED if all(s == JobState.SUCCEEDED for s in self.status) else RunState.FAILED

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
        self.flush()  # durable before its old outputs are forgotten: a crash now re-runs it on restart
        self.run.store.drop_outputs(self.final_id)

    def top(self) -> tuple[int, int] | None:
        """(priority, job) of the best ready job, or None."""
        if not self.heap:
            return None
        p, j = self.heap[0]
        return -p, j

    def preemptions(self, j: int) -> int:
        """Times the job was killed from outside since its budget was last reset."""
        return self.counters[j].preemptions

    def demand(self, j: int) -> tuple[int, int]:
        """(cores, memory MB) the job's next attempt asks for (a site with fewer cores gives it all it has)."""
        return self.resources(j).request_cpus, self.req_mem[j]

    def take(self, j: int, cores: int) -> Launch:
        """Pop ``j`` (the heap's top) as a new attempt, recorded QUEUED; the dispatcher starts it."""
        heapq.heappop(self.heap)
        mem = self.req_mem[j]
        attempt = self.attempts[j] + 1
        self.attempts[j] = attempt
        if j == self.final_id:
            name = label = FinalJob.NAME
        else:
            name, label = self.wf.job_name(j), self.label[j]
            self._ran = True
        # the paths of Run.attempt_paths, as strings first: ~1 µs each instead of ~7 (Path joins)
        base = f"{self._log_root}/{label}/{name}.{attempt}"
        out, err = base + ".out", base + ".err"
        result = base + ".result.json"
        spec = functools.partial(self._launch_spec, j, attempt, mem, result)  # built if a backend asks
        launch = Launch(j, name, label, attempt, cores, mem, self.walltime(j), spec, out, err, result, self.key,
                        self.disk(j))
        self.held += cores
        self._set(j, JobState.QUEUED, message=None)
        if self.record:
            self._attempt_rows.append({
                "job_id": j, "number": attempt, "status": JobState.QUEUED, "request_memory": mem,
                "start": self.wall(), "stdout": out, "stderr": err,
            })
        if label not in self._log_dirs:
            Path(result).parent.mkdir(parents=True, exist_ok=True)
            self._log_dirs.add(label)
        return launch

    def started(self, launch: Launch, handle: str, site: str, now: float) -> None:
        j = launch.job
        self.active[j] = Active(j, launch.attempt, handle, now, launch.cores, launch.memory, launch, site)
        self._set(j, JobState.RUNNING)
        if self.record:
            self._attempt_rows.append({
                "job_id": j, "number": launch.attempt, "status": JobState.RUNNING, "request_memory": launch.memory,
                "handle": handle, "pid": int(handle) if handle.isdigit() else None, "start": now,
                "stdout": str(launch.out), "stderr": str(launch.err), "site": site,
            })

    def not_started(self, launch: Launch, reason: str) -> None:
        """A site refused the attempt (it is unavailable): recorded as infrastructure, budget kept,
        the job ready again for any site."""
        j = launch.job
        self.held -= launch.cores
        self._attempt_rows.append({
            "job_id": j, "number": launch.attempt, "status": JobState.FAILED, "request_memory": launch.memory,
            "failure_class": FailureClass.INFRASTRUCTURE, "message": f"not started: {reason} (budget kept)",
            "end": self.wall(), "stdout": str(launch.out), "stderr": str(launch.err),
        })
        self._set(j, JobState.PENDING, failure_class=FailureClass.INFRASTRUCTURE, message=f"not started: {reason}")
        self.push(j)

    def abandon(self, j: int, reason: str) -> Active:
        """Give up the job's attempt in flight (its site was declared down): recorded as infrastructure,
        budget kept, the job ready again for another site. The attempt, if it still runs somewhere,
        is superseded: the next attempt fences it off from publishing."""
        a = self.active.pop(j)
        self.held -= a.cores
        self._attempt_rows.append({
            "job_id": j, "number": a.attempt, "status": JobState.FAILED, "request_memory": a.memory,
            "failure_class": FailureClass.INFRASTRUCTURE, "message": reason, "end": self.wall(),
            "handle": a.handle, "site": a.site, "stdout": str(a.launch.out), "stderr": str(a.launch.err),
        })
        self._set(j, JobState.PENDING, failure_class=FailureClass.INFRASTRUCTURE, message=reason)
        self.push(j)
        return a

    def _launch_spec(self, j: int, attempt: int, mem: int, result: str | Path) -> dict[str, Any]:
        if j == self.final_id:
            spec = self.wf.final_spec()
            assert spec is not None
            spec["submit_dir"] = str(self.run.submit_dir)
        else:
            spec = self.wf.job_spec(j)
        spec.update(result_path=str(result), attempt=attempt, memory_mb=mem)
        return spec

    # -- ends ---------------------------------------------------------------------------------------
    def finish(self, e: Ended, max_memory: int) -> Active | None:
        """Record an ended attempt and decide what follows (success: children may become ready;
        failure: retry, back off, or fail and mark descendants unready). Returns the attempt it
        ended (the dispatcher frees its site's resources), None for a stale report."""
        a = self.active.get(e.job)
        if a is None or a.attempt != e.attempt:
            return None  # a stale report (e.g. of an attempt abandoned at recovery)
        del self.active[e.job]
        self.held -= a.cores
        j = e.job
        end = self.wall()
        outputs = e.outputs
        if e.staged is not None and e.fclass is None and e.exit_code == 0 and e.signal is None:
            # a shell-script job's post-job, done here by the run's job protocol
            e.exit_code, outputs = self.protocol.post_job(a.launch.spec, a.launch.stderr, e.staged,
                                                          e.started or a.start)
        fclass = e.fclass if e.fclass is not None else classify(e.exit_code, e.signal)
        reason = e.reason
        if fclass is None and outputs is None:
            outputs = self.protocol.outputs(a.launch.result)
            if outputs is None:
                fclass, reason = FailureClass.USER_ERROR, "exit 0 without a committed result manifest"
        if fclass is None and not self.record:  # a simulated success: nothing to keep but the state
            if self.shun:
                self.shun.pop(j, None)
            self._succeeded(j)
            return a
        row: dict[str, Any] = {
            "job_id": j, "number": a.attempt, "request_memory": a.memory, "host": e.host or self.host,
            "handle": a.handle, "pid": int(a.handle) if a.handle.isdigit() else None,
            "start": a.start, "end": end, "wall_s": end - a.start, "stdout": str(a.launch.out),
            "stderr": str(a.launch.err), "exit_code": e.exit_code, "signal": e.signal, "failure_class": fclass,
            "peak_rss_mb": e.peak_rss_mb, "cpu_s": e.cpu_s, "context": e.context or self.context, "site": a.site,
        }
        if e.context and e.context_record and e.context not in self._known_contexts:
            self._contexts[e.context] = e.context_record
        if fclass is None:
            self.shun.pop(j, None)
            row["status"] = JobState.SUCCEEDED
            self._attempt_rows.append(row)
            self._add_outputs(j, outputs or [])
            self._succeeded(j)
            return a
        what = reason or (("" if fclass == FailureClass.KILLED else f"{fclass}: ")  # (not 'killed: killed by')
                          + f"killed by {signal.Signals(e.signal).name}" if e.signal
                          else f"{fclass}: exit code {e.exit_code}")
        line = (fclass == FailureClass.USER_ERROR and self.protocol.cause(a.launch.result)) \
            or self._cause(fclass, a.launch, what, reason)
        if fclass == FailureClass.USER_ERROR and _DISK_ERROR.search(line):
            # the payload could not write (a full, over-quota or read-only disk): not its fault, and
            # not worth its retries; retried as infrastructure, later
            fclass, what = FailureClass.INFRASTRUCTURE, f"infrastructure: the payload could not write: {line}"
            row["failure_class"] = fclass
        row.update(status=JobState.CANCELLED if fclass == FailureClass.CANCELLED else JobState.FAILED,
                   message=what, error_line=line)
        self.extra[j]["cause"] = row["error_line"]  # (incidents group failed jobs by it)
        self._attempt_rows.append(row)
        if fclass == FailureClass.CANCELLED:
            self._set(j, JobState.CANCELLED, failure_class=fclass, exit_code=e.exit_code, message=what)
            return a
        if fclass in (FailureClass.KILLED, FailureClass.INFRASTRUCTURE):
            self.shun[j] = a.site
        else:
            self.shun.pop(j, None)
        d = decide(fclass, self.resources(j), self.counters[j], self.req_mem[j], max_memory, e.exit_code)
        self.req_mem[j] = d.memory
        if d.retry and not self.stopping:
            self._set(j, JobState.PENDING, failure_class=fclass, exit_code=e.exit_code, message=f"{what}; {d.reason}")
            if d.delay > 0:
                heapq.heappush(self.delayed, (self.mono() + d.delay, j))
            else:
                self.push(j)
            return a
        self._set(j, JobState.FAILED, failure_class=fclass, exit_code=e.exit_code, message=f"{what}; {d.reason}")
        self._mark_unready(j)
        return a

    def _succeeded(self, j: int) -> None:
        self._set(j, JobState.SUCCEEDED, exit_code=0, failure_class=None, message=None)
        if j != self.final_id:
            for c in self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]]:
                self.remaining[c] -= 1
                if self.remaining[c] == 0 and self.status[c] == JobState.PENDING:
                    self.push(c)

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

    def _add_outputs(self, j: int, outputs: list[dict[str, Any]]) -> None:
        for o in outputs:
            self._output_rows.append({
                "job_id": j, "node_id": o["node_id"], "dataset_type": o["dataset_type"],
                "data_id": canonical(o["data_id"]), "path": o["path"],
                "size": o.get("size"), "checksum": o.get("checksum"),
            })

    def cancel_rest(self, reason: str) -> None:
        """After the dispatcher stopped the run's attempts: everything not finished is CANCELLED."""
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

    def _merged_attempts(self) -> list[dict[str, Any]]:
        """One row per attempt and flush: an attempt queued, started and ended between two flushes is
        one upsert, not three (each row carries every field it sets; later ones win)."""
        rows = self._attempt_rows
        if len(rows) < 2:
            return rows
        merged: dict[tuple[int, int], dict[str, Any]] = {}
        for r in rows:
            k = (r["job_id"], r["number"])
            m = merged.get(k)
            if m is None:
                merged[k] = r
            else:
                m.update(r)
        return list(merged.values())

    def dirty(self) -> bool:
        return bool(self._dirty or self._attempt_rows or self._output_rows or self._contexts)

    def flush(self) -> None:
        """Everything changed since the last flush, in one transaction of the run's store."""
        if not self.record:  # a simulated run: its state lives here only
            self._dirty.clear()
            self._attempt_rows, self._output_rows, self._contexts = [], [], {}
            if self.progress:
                self.progress(self.counts(), self.label_counts())
            return
        now = self.wall()
        jobs = []
        for j in sorted(self._dirty):
            c, e = self.counters[j], self.extra[j]
            jobs.append({
                "id": j, "status": self.status[j], "attempts": self.attempts[j], "retries": c.retries,
                "preemptions": c.preemptions, "infra_failures": c.infra, "request_memory": self.req_mem[j],
                "failure_class": e.get("failure_class"), "exit_code": e.get("exit_code"),
                "message": e.get("message"), "updated": now,
            })
        self.run.store.write(jobs, self._merged_attempts(), self._output_rows, self._contexts)
        self._known_contexts.update(self._contexts)
        self._contexts = {}
        self._dirty.clear()
        self._attempt_rows = []
        self._output_rows = []
        if self.progress:
            self.progress(self.counts(), self.label_counts())
