"""Local processes as a backend: every attempt is one OS process in its own process group.

Ended attempts are collected with ``wait4`` (exit status + rusage in one call, no thread per job);
the whole process tree of each running attempt is measured (RSS via psutil) and killed at its
memory request (``oom``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import psutil

from batchprod.execution.process import kill_group, kill_group_of, pid_alive, processes_with_env
from batchprod.execution.run import Run
from batchprod.execution.states import FailureClass
from batchprod.wms.base import Backend, Ended, Launch

MONITOR_INTERVAL = 0.1  # seconds between memory checks of running attempts
ENV_SUBMIT_DIR = "BATCHPROD_SUBMIT_DIR"
RUNNER = [sys.executable, "-m", "batchprod.execution.runner"]


def job_env(launch: Launch, submit_dir: str) -> dict[str, str]:
    """Environment of a job: marks it as this run's (so a restart can find orphans) and its attempt."""
    return dict(os.environ, BATCHPROD_JOB=launch.name, BATCHPROD_ATTEMPT=str(launch.attempt),
                OMP_NUM_THREADS=str(launch.cores), **{ENV_SUBMIT_DIR: submit_dir})


def kill_run_processes(submit_dir: str, timeout: float = 10.0) -> None:
    """Kill every process of a run left from a previous orchestrator (found by environment, so even
    attempts whose pid was never recorded are found) and wait until they are gone."""
    orphans = processes_with_env(ENV_SUBMIT_DIR, submit_dir)
    for pid in orphans:
        kill_group_of(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in orphans) and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclass
class _Proc:
    launch: Launch
    popen: subprocess.Popen[bytes]
    files: list[IO[bytes]]
    proc: psutil.Process | None
    peak_rss: float = 0.0
    forced: FailureClass | None = None
    reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, submit_dir: str) -> None:
        self.submit_dir = submit_dir
        self.procs: dict[int, _Proc] = {}
        self.host = socket.gethostname()
        self._last_monitor = 0.0

    def start(self, launches: Sequence[Launch]) -> list[str]:
        handles = []
        for launch in launches:
            fo, fe = open(launch.stdout, "wb"), open(launch.stderr, "wb")  # noqa: SIM115 (closed when reaped)
            popen = subprocess.Popen(
                RUNNER, stdin=subprocess.PIPE, stdout=fo, stderr=fe,
                start_new_session=True,  # own process group: kills reach the whole tree
                env=job_env(launch, self.submit_dir),
            )
            assert popen.stdin is not None
            try:
                popen.stdin.write(json.dumps(launch.spec).encode())
                popen.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc: psutil.Process | None = psutil.Process(popen.pid)
            except psutil.NoSuchProcess:
                proc = None
            self.procs[popen.pid] = _Proc(launch, popen, [fo, fe], proc)
            handles.append(str(popen.pid))
        return handles

    def active(self) -> int:
        return len(self.procs)

    def running_since(self, handle: str) -> float | None:
        p = self.procs.get(int(handle))
        return p.started if p else None

    def _monitor(self) -> None:
        """Kill attempts whose process tree is over their memory request."""
        for pid, p in self.procs.items():
            if p.forced is not None or p.proc is None:
                continue
            try:
                rss = p.proc.memory_info().rss
                for c in p.proc.children(recursive=True):
                    try:
                        rss += c.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
            except psutil.NoSuchProcess:
                continue
            mb = rss / 2**20
            p.peak_rss = max(p.peak_rss, mb)
            if mb > p.launch.memory:
                p.forced = FailureClass.OOM
                p.reason = f"oom: process tree used {mb:.0f} MB > requestMemory {p.launch.memory} MB"
                kill_group(pid, signal.SIGKILL)

    def poll(self) -> list[Ended]:
        now = time.monotonic()
        if now - self._last_monitor > MONITOR_INTERVAL:
            self._monitor()
            self._last_monitor = now
        out: list[Ended] = []
        while self.procs:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            p = self.procs.pop(pid, None)
            if p is None:
                continue
            p.popen.returncode = os.waitstatus_to_exitcode(status)
            for f in p.files:
                f.close()
            out.append(Ended(
                p.launch.job, p.launch.attempt,
                exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                fclass=p.forced, reason=p.reason,
                peak_rss_mb=max(p.peak_rss, ru.ru_maxrss / 1024), cpu_s=ru.ru_utime + ru.ru_stime, host=self.host,
            ))
        return out

    def kill(self, handle: str, fclass: FailureClass, reason: str) -> None:
        pid = int(handle)
        p = self.procs.get(pid)
        if p is None:
            return
        if p.forced is None:
            p.forced, p.reason = fclass, reason
        if fclass == FailureClass.CANCELLED:
            kill_group(pid, signal.SIGTERM)  # polite first; the hard kill follows after a grace period
            p.extra["term_sent"] = str(time.monotonic())
        else:
            kill_group(pid, signal.SIGKILL)

    def escalate(self, grace: float) -> None:
        now = time.monotonic()
        for pid, p in self.procs.items():
            sent = p.extra.get("term_sent")
            if sent and now - float(sent) > grace:
                kill_group(pid, signal.SIGKILL)

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        kill_run_processes(str(run.submit_dir))
