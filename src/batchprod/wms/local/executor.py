"""The embedded local executor: every job its own OS process, scheduled by priority in a budget.

The orchestrator keeps the DAG in arrays (remaining-parent counts, a ready heap ordered by
priority) and reaps children with ``wait4`` (exit status + rusage in one call, no thread per job).
It measures each running job's whole process tree (RSS via psutil) and kills it at its memory
request (``oom``) or walltime (``timeout``).

Crash safety: an attempt is committed to the state store *before* its process starts, and every
state change before it (a parent's success, say) is committed in the same transaction. Completed
work is also committed on the compute side (the runner's ``result.json``), so a restart after a
``kill -9`` adopts what finished and re-runs only what did not.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from batchprod.execution.logs import first_error_line
from batchprod.execution.policy import JobCounters, decide
from batchprod.execution.process import (
    kill_group,
    kill_group_of,
    pid_alive,
    process_start,
    processes_with_env,
)
from batchprod.execution.run import Run
from batchprod.execution.runner import (
    EXIT_INFRASTRUCTURE,
    EXIT_MEMORY_ERROR,
    KILL_SIGNALS,
    StageError,
    commit_outputs,
)
from batchprod.execution.states import FailureClass, JobState, RunState
from batchprod.wms.base import Progress
from batchprod.workflow.generic import FinalJob, Resources

FLUSH_INTERVAL = 0.25  # seconds between state commits
MONITOR_INTERVAL = 0.1  # seconds between memory/walltime checks of running jobs
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a job's process group
ENV_SUBMIT_DIR = "BATCHPROD_SUBMIT_DIR"


@dataclass
class _Running:
    job: int
    popen: subprocess.Popen[bytes]
    attempt: int
    start: float
    cores: int
    memory: int
    stdout: Path
    stderr: Path
    result: Path
    files: list[IO[bytes]] = field(default_factory=list)
    proc: psutil.Process | None = None
    peak_rss: float = 0.0  # MB, sampled over the whole process tree
    forced: FailureClass | None = None  # set when we killed it (oom, timeout, cancel)
    reason: str | None = None


def classify(status: int, forced: FailureClass | None) -> FailureClass | None:
    """Failure class of an ended attempt from its wait status (None = success)."""
    if forced is not None:
        return forced
    if os.WIFSIGNALED(status):
        return FailureClass.KILLED if os.WTERMSIG(status) in KILL_SIGNALS else FailureClass.USER_ERROR
    code = os.WEXITSTATUS(status)
    if code == 0:
        return None
    if code == EXIT_MEMORY_ERROR:
        return FailureClass.OOM
    if code == EXIT_INFRASTRUCTURE:
        return FailureClass.INFRASTRUCTURE
    return FailureClass.USER_ERROR


class LocalExecutor:
    """Runs (or resumes) one prepared run on this machine."""

    def __init__(
        self,
        run: Run,
        cores: int | None = None,
        memory_mb: int | None = None,
        progress: Progress | None = None,
        poll: float = 0.005,
    ) -> None:
        self.run = run
        self.wf = run.workflow
        site_cores, site_mem = run.site_budget()
        self.cores = cores or site_cores or (os.cpu_count() or 1)
        self.memory = memory_mb or site_mem or int(psutil.virtual_memory().total / 2**20)
        self.progress = progress
        self.poll = poll
        self.host = socket.gethostname()
        self._stop: str | None = None
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
        self.running: dict[int, _Running] = {}  # pid -> running job
        self.delayed: list[tuple[float, int]] = []  # (not before, job): back-off
        self.heap: list[tuple[int, int]] = []
        self.used_cores = 0
        self.used_memory = 0
        self.submit_key = str(run.submit_dir)

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
        d = self.run.log_dir / self.job_label(j)
        name = self.name(j)
        return d / f"{name}.{attempt}.out", d / f"{name}.{attempt}.err", d / f"{name}.{attempt}.result.json"

    def _set(self, j: int, state: JobState, **fields: Any) -> None:
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
            raise RuntimeError(f"state store has {len(rows)} jobs, workflow has {total}")
        self.status = [JobState(r[1]) for r in rows]
        self.attempts = [int(r[2]) for r in rows]
        self.req_mem = [int(r[3]) for r in rows]
        self.counters = [JobCounters() for _ in rows]
        self.extra: list[dict[str, Any]] = [{} for _ in rows]
        for j, s in enumerate(self.status):
            if s in (JobState.FAILED, JobState.UNREADY, JobState.CANCELLED, JobState.KILLED, JobState.HELD):
                self._set(j, JobState.PENDING, message="reset by restart", failure_class=None, exit_code=None)

    def _recover(self) -> int:
        """After an orchestrator loss: stop orphaned job processes, adopt attempts that completed,
        and put the rest back in the queue without spending their budget. Returns jobs recovered."""
        active = [j for j, s in enumerate(self.status) if s in (JobState.RUNNING, JobState.QUEUED, JobState.READY)]
        orphans = processes_with_env(ENV_SUBMIT_DIR, self.submit_key)
        for pid in orphans:
            kill_group_of(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in orphans) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not active:
            return 0
        # the last attempt of a job the store shows active is the one still marked QUEUED/RUNNING
        last = {a["job_id"]: a for a in self.run.store.attempts(status=[JobState.QUEUED, JobState.RUNNING])}
        now = time.time()
        for j in active:
            a = last.get(j)
            if self.status[j] == JobState.READY or a is None or a["status"] not in (JobState.RUNNING, JobState.QUEUED):
                self._set(j, JobState.PENDING)
                continue
            result = self.log_paths(j, a["number"])[2]
            adopted = False
            if not result.exists() and Path(f"{result}.pending").exists():
                with contextlib.suppress(StageError, OSError, ValueError):
                    commit_outputs(result)  # roll a half-done publication forward
            if result.exists():
                self._record_outputs(j, result)
                adopted = True
            row = {**a, "end": a.get("end") or now}
            if adopted:
                row.update(status=JobState.SUCCEEDED, exit_code=0, message="completed while the orchestrator was down; adopted")
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
        self._load_state()
        store = self.run.store
        self._recover()
        me = os.getpid()
        store.set_run(status=RunState.RUNNING, orchestrator_pid=me, orchestrator_host=self.host,
                      orchestrator_start=process_start(me))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            state = self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self._flush()
        store.set_run(status=state, orchestrator_pid=None)
        return state

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
        last_flush = last_monitor = 0.0
        while True:
            if self._stop:
                self._cancel_all()
                return RunState.CANCELLED
            now = time.monotonic()
            while self.delayed and self.delayed[0][0] <= now:
                self._push(heapq.heappop(self.delayed)[1])
            launched = self._launch_ready()
            reaped = self._reap()
            if now - last_monitor > MONITOR_INTERVAL:
                self._monitor()
                last_monitor = now
            if now - last_flush > FLUSH_INTERVAL:
                self._flush()
                last_flush = now
            if not self.running and not self.heap and not self.delayed:
                if self.final_id is not None and self.status[self.final_id] == JobState.PENDING:
                    assert self.wf.final is not None
                    all_ok = all(s == JobState.SUCCEEDED for s in self.status[:n])
                    if self.wf.final.when_run == "ALWAYS" or all_ok:
                        self._push(self.final_id)
                        continue
                    self._set(self.final_id, JobState.UNREADY, message="not run: whenRun=SUCCESS and some jobs failed")
                break
            if not launched and not reaped:
                time.sleep(self.poll)
        ok = all(s == JobState.SUCCEEDED for s in self.status)
        return RunState.SUCCEEDED if ok else RunState.FAILED

    def _push(self, j: int) -> None:
        heapq.heappush(self.heap, (-self.resources(j).priority, j))
        if self.status[j] != JobState.READY:
            self._set(j, JobState.READY)

    def _launch_ready(self) -> int:
        batch: list[tuple[int, int, int, int]] = []
        while self.heap:
            _, j = self.heap[0]
            mem = self.req_mem[j]
            cores = min(self.resources(j).request_cpus, self.cores)
            fits = self.used_cores + cores <= self.cores and self.used_memory + mem <= self.memory
            # Strict priority: wait for room rather than let smaller jobs jump ahead. A job bigger than
            # the whole budget (prepare rejects those when the site sets one) runs alone, not never.
            if not fits and (self.running or batch):
                break
            heapq.heappop(self.heap)
            attempt = self.attempts[j] + 1
            self.attempts[j] = attempt
            out, err, _ = self.log_paths(j, attempt)
            self._set(j, JobState.QUEUED, message=None)
            self._attempt_rows.append({
                "job_id": j, "number": attempt, "status": JobState.QUEUED, "request_memory": mem,
                "host": self.host, "start": time.time(), "stdout": str(out), "stderr": str(err),
            })
            self.used_cores += cores
            self.used_memory += mem
            batch.append((j, attempt, cores, mem))
        if not batch:
            return 0
        self._flush()  # the attempts (and everything before them) are durable before any process starts
        for j, attempt, cores, mem in batch:
            self._start(j, attempt, cores, mem)
        return len(batch)

    def _spec(self, j: int) -> dict[str, Any]:
        if j == self.final_id:
            spec = self.wf.final_spec()
            assert spec is not None
            spec["submit_dir"] = str(self.run.submit_dir)
            return spec
        return self.wf.job_spec(j)

    def _start(self, j: int, attempt: int, cores: int, mem: int) -> None:
        out, err, result = self.log_paths(j, attempt)
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = self._spec(j)
        spec.update(result_path=str(result), attempt=attempt)
        fo, fe = open(out, "wb"), open(err, "wb")  # noqa: SIM115 (closed when reaped)
        env = dict(os.environ, BATCHPROD_JOB=self.name(j), BATCHPROD_ATTEMPT=str(attempt),
                   OMP_NUM_THREADS=str(cores), **{ENV_SUBMIT_DIR: self.submit_key})
        popen = subprocess.Popen(
            [sys.executable, "-m", "batchprod.execution.runner"],
            stdin=subprocess.PIPE, stdout=fo, stderr=fe,
            start_new_session=True,  # own process group: cancel/kill reaches the whole tree
            env=env,
        )
        assert popen.stdin is not None
        try:
            popen.stdin.write(json.dumps(spec).encode())
            popen.stdin.close()
        except BrokenPipeError:
            pass
        now = time.time()
        try:
            proc: psutil.Process | None = psutil.Process(popen.pid)
        except psutil.NoSuchProcess:
            proc = None
        self.running[popen.pid] = _Running(j, popen, attempt, now, cores, mem, out, err, result, [fo, fe], proc)
        self._set(j, JobState.RUNNING)
        self._attempt_rows.append({
            "job_id": j, "number": attempt, "status": JobState.RUNNING, "request_memory": mem, "host": self.host,
            "pid": popen.pid, "start": now, "stdout": str(out), "stderr": str(err),
        })

    def _monitor(self) -> None:
        """Kill jobs over their memory request (whole process tree) or past their walltime."""
        now = time.time()
        for pid, r in list(self.running.items()):
            if r.forced is not None:
                continue
            wall = self.resources(r.job).request_walltime
            if wall and now - r.start > wall:
                r.forced, r.reason = FailureClass.TIMEOUT, f"timeout: past requestWalltime {wall}s"
                kill_group(pid, signal.SIGKILL)
                continue
            if r.proc is None:
                continue
            try:
                rss = r.proc.memory_info().rss
                for c in r.proc.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss += c.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            mb = rss / 2**20
            r.peak_rss = max(r.peak_rss, mb)
            if mb > r.memory:
                r.forced, r.reason = FailureClass.OOM, f"oom: process tree used {mb:.0f} MB > requestMemory {r.memory} MB"
                kill_group(pid, signal.SIGKILL)

    def _reap(self, cancelling: bool = False) -> int:
        """Collect every exited child (status + rusage from one wait4); returns how many."""
        reaped = 0
        while self.running:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.running.clear()
                break
            if pid == 0:
                break
            r = self.running.pop(pid, None)
            if r is None:
                continue
            reaped += 1
            r.popen.returncode = os.waitstatus_to_exitcode(status)
            for f in r.files:
                f.close()
            self.used_cores -= r.cores
            self.used_memory -= r.memory
            if cancelling and r.forced is None:
                r.forced, r.reason = FailureClass.CANCELLED, f"cancelled ({self._stop})"
            self._finish(r, status, ru)
        return reaped

    def _finish(self, r: _Running, status: int, ru: Any) -> None:
        j = r.job
        end = time.time()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        fclass = classify(status, r.forced)
        if fclass is None and not r.result.exists():
            fclass, r.reason = FailureClass.USER_ERROR, "exit 0 without a committed result manifest"
        peak = max(r.peak_rss, ru.ru_maxrss / 1024 if ru is not None else 0.0)
        row: dict[str, Any] = {
            "job_id": j, "number": r.attempt, "request_memory": r.memory, "host": self.host, "pid": r.popen.pid,
            "start": r.start, "end": end, "wall_s": end - r.start, "stdout": str(r.stdout), "stderr": str(r.stderr),
            "exit_code": code, "signal": sig, "failure_class": fclass, "peak_rss_mb": peak,
            "cpu_s": (ru.ru_utime + ru.ru_stime) if ru is not None else None,
        }
        if fclass is None:
            row["status"] = JobState.SUCCEEDED
            self._attempt_rows.append(row)
            self._record_outputs(j, r.result)
            self._set(j, JobState.SUCCEEDED, exit_code=0, failure_class=None, message=None)
            if j != self.final_id:
                for c in self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]]:
                    self.remaining[c] -= 1
                    if self.remaining[c] == 0 and self.status[c] == JobState.PENDING:
                        self._push(c)
            return
        what = r.reason or (f"{fclass}: killed by {signal.Signals(sig).name}" if sig else f"{fclass}: exit code {code}")
        row.update(status=JobState.CANCELLED if fclass == FailureClass.CANCELLED else JobState.FAILED,
                   message=what, error_line=first_error_line(r.stderr))
        self._attempt_rows.append(row)
        if fclass == FailureClass.CANCELLED:
            self._set(j, JobState.CANCELLED, failure_class=fclass, exit_code=code, message=what)
            return
        d = decide(fclass, self.resources(j), self.counters[j], self.req_mem[j], self.memory)
        self.req_mem[j] = d.memory
        if d.retry and not self._stop:
            self._set(j, JobState.PENDING, failure_class=fclass, exit_code=code, message=f"{what}; {d.reason}")
            if d.delay > 0:
                heapq.heappush(self.delayed, (time.monotonic() + d.delay, j))
            else:
                self._push(j)
            return
        self._set(j, JobState.FAILED, failure_class=fclass, exit_code=code, message=f"{what}; {d.reason}")
        self._mark_unready(j)

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
        for o in manifest.get("outputs", []):
            self._output_rows.append({
                "job_id": j, "node_id": o["node_id"], "dataset_type": o["dataset_type"],
                "data_id": json.dumps(o["data_id"], sort_keys=True), "path": o["path"],
                "size": o.get("size"), "checksum": o.get("checksum"),
            })

    def _cancel_all(self) -> None:
        for pid in list(self.running):
            kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while self.running and time.monotonic() < deadline:
            if not self._reap(cancelling=True):
                time.sleep(0.02)
        for pid in list(self.running):
            kill_group(pid, signal.SIGKILL)
        while self.running:
            if not self._reap(cancelling=True):
                time.sleep(0.01)
        for j, s in enumerate(self.status):
            if s in (JobState.PENDING, JobState.READY, JobState.QUEUED):
                self._set(j, JobState.CANCELLED, message=f"run cancelled ({self._stop})")
        self.heap.clear()
        self.delayed.clear()

    # -- state --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(Counter(str(s) for s in self.status))

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
        self.run.store.write(jobs, self._attempt_rows, self._output_rows)
        self._dirty.clear()
        self._attempt_rows = []
        self._output_rows = []
        if self.progress:
            self.progress(self.counts())
