"""The embedded local executor: every job its own OS process, scheduled by priority in a budget.

The orchestrator keeps the DAG in arrays (remaining-parent counts, a ready heap ordered by
priority) and reaps children with ``wait4`` (exit status + rusage in one call, no thread per job).
State changes are buffered and committed in one transaction per flush interval; the store is the
source of truth for report and restart.
"""

from __future__ import annotations

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

from batchprod.execution.process import kill_group
from batchprod.execution.run import Run
from batchprod.execution.runner import EXIT_MEMORY_ERROR
from batchprod.execution.states import FailureClass, JobState, RunState
from batchprod.wms.base import Progress
from batchprod.workflow.generic import FinalJob, Resources

FLUSH_INTERVAL = 0.25  # seconds between state commits
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a job's process group


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


class LocalExecutor:
    """Runs one prepared run on this machine."""

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
        self.used_cores = 0
        self.used_memory = 0
        self.peak_cores = 0
        self.peak_memory = 0
        self.launch_order: list[int] = []

    # -- helpers ------------------------------------------------------------------------------------
    def name(self, j: int) -> str:
        if j == self.final_id:
            return FinalJob.NAME
        if j not in self._names:
            self._names[j] = self.wf.job_name(j)
        return self._names[j]

    def resources(self, j: int) -> Resources:
        if j == self.final_id:
            assert self.wf.final is not None
            return self.wf.final.resources
        return self.group_res[self.job_group[j]]

    def _set(self, j: int, state: JobState, **fields: Any) -> None:
        self.status[j] = state
        self.extra[j].update(fields)
        self._dirty.add(j)

    def _load_state(self) -> None:
        """Arrays from the store: status, attempts and learned memory of every job."""
        rows = self.run.store.job_columns("id", "status", "attempts", "request_memory")
        total = self.n + (1 if self.final_id is not None else 0)
        if len(rows) != total:
            raise RuntimeError(f"state store has {len(rows)} jobs, workflow has {total}")
        self.status = [JobState(r[1]) for r in rows]
        self.attempts = [int(r[2]) for r in rows]
        self.req_mem = [int(r[3]) for r in rows]
        self.extra: list[dict[str, Any]] = [{} for _ in rows]

    # -- main loop ----------------------------------------------------------------------------------
    def execute(self) -> RunState:
        self._load_state()
        store = self.run.store
        store.set_run(status=RunState.RUNNING, orchestrator_pid=os.getpid(), orchestrator_host=self.host)
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

    def _loop(self) -> RunState:
        n = self.n
        succeeded = [s == JobState.SUCCEEDED for s in self.status]
        self.remaining = [0] * n
        for j in range(n):
            for c in self.child_idx[self.child_ptr[j] : self.child_ptr[j + 1]]:
                if not succeeded[j]:
                    self.remaining[c] += 1
        self.heap: list[tuple[int, int]] = []
        for j in range(n):
            if self.status[j] in (JobState.PENDING, JobState.READY) and self.remaining[j] == 0:
                self._push(j)
        last_flush = 0.0
        while True:
            if self._stop:
                self._cancel_all()
                return RunState.CANCELLED
            launched = self._launch_ready()
            reaped = self._reap()
            self._check_walltime()
            now = time.monotonic()
            if now - last_flush > FLUSH_INTERVAL:
                self._flush()
                last_flush = now
            if not self.running and not self.heap:
                if self.final_id is not None and self.status[self.final_id] in (JobState.PENDING, JobState.READY):
                    self._flush()
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
        prio = self.resources(j).priority
        heapq.heappush(self.heap, (-prio, j))
        if self.status[j] != JobState.READY:
            self._set(j, JobState.READY)

    def _launch_ready(self) -> int:
        launched = 0
        while self.heap:
            _, j = self.heap[0]
            res = self.resources(j)
            mem = self.req_mem[j]
            cores = min(res.request_cpus, self.cores)
            fits = self.used_cores + cores <= self.cores and self.used_memory + mem <= self.memory
            # Strict priority: wait for room rather than let smaller jobs jump ahead. A job bigger than
            # the whole budget (prepare rejects those when the site sets one) runs alone, not never.
            if not fits and self.running:
                break
            heapq.heappop(self.heap)
            self._launch(j, cores, mem)
            launched += 1
        return launched

    def _spec(self, j: int) -> dict[str, Any]:
        if j == self.final_id:
            spec = self.wf.final_spec()
            assert spec is not None
            spec["submit_dir"] = str(self.run.submit_dir)
            return spec
        return self.wf.job_spec(j)

    def _launch(self, j: int, cores: int, mem: int) -> None:
        attempt = self.attempts[j] + 1
        self.attempts[j] = attempt
        name = self.name(j)
        d = self.run.log_dir / (self.label[j] if j != self.final_id else FinalJob.NAME)
        d.mkdir(parents=True, exist_ok=True)
        out, err, result = (d / f"{name}.{attempt}.{ext}" for ext in ("out", "err", "result.json"))
        spec = self._spec(j)
        spec["result_path"] = str(result)
        spec["attempt"] = attempt
        fo, fe = open(out, "wb"), open(err, "wb")  # noqa: SIM115 (closed when reaped)
        env = dict(os.environ, BATCHPROD_JOB=name, BATCHPROD_ATTEMPT=str(attempt), OMP_NUM_THREADS=str(cores))
        popen = subprocess.Popen(
            [sys.executable, "-m", "batchprod.execution.runner"],
            stdin=subprocess.PIPE,
            stdout=fo,
            stderr=fe,
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
        self.running[popen.pid] = _Running(j, popen, attempt, now, cores, mem, out, err, result, [fo, fe])
        self.used_cores += cores
        self.used_memory += mem
        self.peak_cores = max(self.peak_cores, self.used_cores)
        self.peak_memory = max(self.peak_memory, self.used_memory)
        self.launch_order.append(j)
        self._set(j, JobState.RUNNING, attempts=attempt)
        self._attempt_rows.append(
            {
                "job_id": j, "number": attempt, "status": JobState.RUNNING, "request_memory": mem,
                "host": self.host, "pid": popen.pid, "start": now, "stdout": str(out), "stderr": str(err),
            }
        )

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
            ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            self._finish(r, status, ru, FailureClass.CANCELLED if cancelling and not ok else None)
        return reaped

    def _finish(self, r: _Running, status: int, ru: Any, forced: FailureClass | None = None) -> None:
        j = r.job
        end = time.time()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        fclass: FailureClass | None = forced
        if fclass is None and sig is not None:
            fclass = FailureClass.KILLED
        elif fclass is None and code == EXIT_MEMORY_ERROR:
            fclass = FailureClass.OOM
        elif fclass is None and code != 0:
            fclass = FailureClass.USER_ERROR
        row = {
            "job_id": j, "number": r.attempt, "request_memory": r.memory, "host": self.host, "pid": r.popen.pid,
            "start": r.start, "end": end, "wall_s": end - r.start, "stdout": str(r.stdout), "stderr": str(r.stderr),
            "exit_code": code, "signal": sig, "failure_class": fclass,
            "peak_rss_mb": ru.ru_maxrss / 1024 if ru is not None else None,
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
        row["status"] = JobState.CANCELLED if fclass == FailureClass.CANCELLED else JobState.FAILED
        msg = self._describe(fclass, code, sig)
        row["message"] = msg
        self._attempt_rows.append(row)
        if fclass == FailureClass.CANCELLED:
            self._set(j, JobState.CANCELLED, failure_class=fclass, exit_code=code, message=msg)
            return
        res = self.resources(j)
        if self.attempts[j] <= res.number_of_retries and not self._stop:
            self._set(j, JobState.PENDING, failure_class=fclass, exit_code=code, message=f"retrying after {msg}")
            self._push(j)
            return
        self._set(j, JobState.FAILED, failure_class=fclass, exit_code=code, message=msg)
        self._mark_unready(j)

    @staticmethod
    def _describe(fclass: FailureClass, code: int | None, sig: int | None) -> str:
        if sig is not None:
            return f"{fclass}: killed by {signal.Signals(sig).name}"
        return f"{fclass}: exit code {code}"

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
            self._output_rows.append(
                {
                    "job_id": j, "node_id": o["node_id"], "dataset_type": o["dataset_type"],
                    "data_id": json.dumps(o["data_id"], sort_keys=True), "path": o["path"],
                    "size": o.get("size"), "checksum": o.get("checksum"),
                }
            )

    def _check_walltime(self) -> None:
        if not self.running:
            return
        now = time.time()
        for r in list(self.running.values()):
            wall = self.resources(r.job).request_walltime
            if wall and now - r.start > wall:
                kill_group(r.popen.pid, signal.SIGKILL)

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
            if s in (JobState.PENDING, JobState.READY):
                self._set(j, JobState.CANCELLED, message=f"run cancelled ({self._stop})")
        self.heap.clear()

    # -- state --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(Counter(str(s) for s in self.status))

    def _flush(self) -> None:
        now = time.time()
        jobs = [
            {
                "id": j, "status": self.status[j], "attempts": self.attempts[j], "request_memory": self.req_mem[j],
                "failure_class": self.extra[j].get("failure_class"), "exit_code": self.extra[j].get("exit_code"),
                "message": self.extra[j].get("message"), "updated": now,
            }
            for j in sorted(self._dirty)
        ]
        self.run.store.write(jobs, self._attempt_rows, self._output_rows)
        self._dirty.clear()
        self._attempt_rows = []
        self._output_rows = []
        if self.progress:
            self.progress(self.counts())
