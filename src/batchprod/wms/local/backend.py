"""Local processes as a backend: every attempt is one OS process in its own process group.

Ended attempts are collected with ``wait4`` (exit status + rusage in one call, no thread per job);
the whole process tree of each running attempt is measured (RSS via psutil) and killed at its
memory request (``oom``).

Peak memory of an attempt: the largest tree RSS sampled, or the kernel's peak from ``wait4`` when it
is above :func:`spawn_baseline_kb`. Below that the kernel's figure is the orchestrator's, not the
job's: Linux records the peak of the address space a process leaves at ``exec`` — for a child of the
orchestrator, the orchestrator's own (every job used to show the same ~60 MB). An attempt too short to
be sampled and under that baseline has no peak (None: not measured) rather than a wrong one. CPU
seconds are the kernel's (the job and every descendant it waited for).

A job made only of shell commands runs *inline* (see ``wms/inline.py``): its script is started directly (``/bin/bash``) and
the wrapper's pre-job (stage-in check) and post-job (checksums, manifest, publication) steps run
here in the orchestrator, because a Python interpreter per job (~50 ms of imports) would cap local
dispatch at a few dozen jobs per second. Jobs with Python payloads start the Python wrapper.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import psutil
from pydantic import Field

from batchprod.execution.commands import BASH
from batchprod.execution.process import kill_group, kill_group_of, pid_alive, processes_with_env, tree_usage
from batchprod.execution.protocol import write_fence
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.wms.base import Backend, Capacity, Ended, Launch
from batchprod.wms.inline import (
    ENV_SUBMIT_DIR,
    InlineJobs,
    engine_disk_trouble,
    job_variables,
)
from batchprod.wms.settings import Cores, Count, MemoryMB, SiteSettings

#: children reaped by one LocalBackend's wait4(-1) that another one started (several local sites
#: in one engine), pid -> (status, rusage): picked up by the owner's next poll
_REAPED: dict[int, tuple[int, Any]] = {}

MONITOR_INTERVAL = 0.1  # seconds between memory checks of running attempts (and longest wait)
RUNNER = [sys.executable, "-m", "batchprod.execution.runner"]


class LocalSettings(SiteSettings):
    """``site.<name>`` of a local site: this machine, within a budget."""

    wms = "local"
    cores: Cores | None = Field(None, description="cores the site's jobs may use at once (default: this machine's)")
    memory: MemoryMB | None = Field(None, description="memory (MB, or with a unit: 8GB) the site's jobs may use "
                                    "at once; 0 or unset: this machine's")
    max_jobs: Count | None = Field(None, description="attempts running at once (default: no limit but cores and "
                                   "memory); also the MAXJOBS of an HTCondor export")


def job_env(launch: Launch, base: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """Environment of a job: marks it as its run's (so a restart can find orphans) and its attempt.
    Bytes throughout: subprocess would otherwise encode every variable of every job."""
    env = dict(base if base is not None else os.environb)
    env.update((os.fsencode(k), os.fsencode(v)) for k, v in job_variables(launch).items())
    return env


def spawn_baseline_kb() -> int:
    """The most a child's ``ru_maxrss`` can owe to its parent: our own peak RSS (KiB), read after
    the child was started. A child reports at least the peak of our address space when it started
    (vfork) or its size then (fork)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def job_peak_mb(sampled_mb: float, ru_maxrss_kb: int, baseline_kb: int) -> float | None:
    """Peak RSS of an ended attempt: the sampled tree peak, or the kernel's when it is the job's
    (above what it inherited from us); None when neither measured it."""
    kernel = ru_maxrss_kb / 1024 if ru_maxrss_kb > baseline_kb else 0.0
    peak = max(sampled_mb, kernel)
    return peak if peak > 0 else None


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
    tree_cpu: float = 0.0  # the CPU its whole tree had used at the last sample (see tree_usage)
    forced: FailureClass | None = None
    reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    staged: dict[str, str] | None = None  # set for inline jobs: the orchestrator does post-job
    pidfd: int | None = None  # readable when the process ends: wait() sleeps until then
    baseline_kb: int = 0  # a wait4 peak up to this is the orchestrator's, not the job's


class LocalBackend(Backend):
    """A local site: starts attempts of any run (each launch says whose) as processes here."""

    name = "local"

    def __init__(self, settings: LocalSettings | None = None, inline: bool = True) -> None:
        settings = settings or LocalSettings()
        self.settings = settings
        # this machine's, unless the site says less
        self._capacity = Capacity(settings.cores or os.cpu_count() or 1,
                                  settings.memory or int(psutil.virtual_memory().total / 2**20),
                                  settings.max_jobs)
        self.inline = inline
        self._env = dict(os.environb)  # copied once
        self.procs: dict[int, _Proc] = {}
        self.host = socket.gethostname()
        self._inline = InlineJobs(self.host)
        self._last_monitor = 0.0
        self._ends = select.poll()  # pidfds of running attempts
        self._pidfds = hasattr(os, "pidfd_open")

    def capacity(self) -> Capacity:
        return self._capacity

    def start(self, launches: Sequence[Launch]) -> list[str]:
        handles = []
        for launch in launches:
            script, staged, ok = self._inline.plan(launch) if self.inline else self._plain(launch)
            if not ok:
                handles.append("-")
                continue
            cmd = [BASH, "-c", script] if script is not None else RUNNER
            try:
                fo = open(launch.stdout, "wb")  # noqa: SIM115 (closed when reaped)
                try:
                    fe = open(launch.stderr, "wb")  # noqa: SIM115
                except OSError:
                    fo.close()
                    raise
            except OSError as exc:  # the log directory is gone or refuses us: not the job's fault
                engine_disk_trouble(exc)
                self._inline.fail_early(launch, f"stage-in: cannot open the attempt's logs: {exc}")
                handles.append("-")
                continue
            try:
                popen = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL if script is not None else subprocess.PIPE, stdout=fo, stderr=fe,
                    start_new_session=True,  # own process group: kills reach the whole tree
                    env=job_env(launch, self._env),
                )
            except OSError as exc:  # no process could be started (out of pids, memory): try again later
                fo.close()
                fe.close()
                engine_disk_trouble(exc)
                self._inline.fail_early(launch, f"stage-in: cannot start the attempt: {exc}")
                handles.append("-")
                continue
            if script is None:
                assert popen.stdin is not None
                try:
                    popen.stdin.write(json.dumps(launch.spec).encode())
                    popen.stdin.close()
                except BrokenPipeError:
                    pass
            # taken after the start: our peak only grows, so this bounds what the child inherited
            p = _Proc(launch, popen, [fo, fe], None, staged=staged if script is not None else None,
                      baseline_kb=spawn_baseline_kb())
            if self._pidfds:
                try:
                    p.pidfd = os.pidfd_open(popen.pid)  # works on a zombie too: it is not reaped yet
                    self._ends.register(p.pidfd, select.POLLIN)
                except OSError:
                    self._pidfds = False  # no pidfds (old kernel): wait() falls back to short sleeps
            self.procs[popen.pid] = p
            handles.append(str(popen.pid))
        return handles

    def _plain(self, launch: Launch) -> tuple[None, dict[str, str], bool]:
        """Without inline jobs (every job through the Python wrapper): fence off earlier attempts."""
        try:
            write_fence(launch.result, launch.attempt)
        except OSError as exc:
            engine_disk_trouble(exc)
            self._inline.fail_early(launch, f"stage-in: cannot prepare the attempt: {exc}")
            return None, {}, False
        return None, {}, True

    def active(self) -> int:
        return len(self.procs) + len(self._inline.early)

    def wait(self, timeout: float) -> None:
        """Sleep until a running attempt ends (its pidfd becomes readable), at most until the next
        memory check: a 3 ms job is collected when it ends, not at the next fixed tick."""
        if self._inline.early:
            return
        if not self.procs or not self._pidfds:
            time.sleep(timeout)
            return
        wake = max(0.0, self._last_monitor + MONITOR_INTERVAL - time.monotonic())
        self._ends.poll(max(timeout, wake) * 1000)

    def running_since(self, handle: str) -> float | None:
        p = self.procs.get(int(handle))
        return p.started if p else None

    def _monitor(self) -> None:
        """Kill attempts whose process tree is over their memory request."""
        now = time.time()
        for pid, p in self.procs.items():
            # a job younger than one interval is not sampled: most short jobs never cost a /proc scan
            if p.forced is not None or now - p.started < MONITOR_INTERVAL:
                continue
            try:
                if p.proc is None:
                    p.proc = psutil.Process(pid)
                mb, cpu = tree_usage(p.proc)
            except psutil.NoSuchProcess:
                continue
            p.peak_rss = max(p.peak_rss, mb)
            p.tree_cpu = max(p.tree_cpu, cpu)
            if mb > p.launch.memory:
                p.forced = FailureClass.OOM
                p.reason = f"oom: process tree used {mb:.0f} MB > requestMemory {p.launch.memory} MB"
                kill_group(pid, signal.SIGKILL)

    def poll(self) -> list[Ended]:
        now = time.monotonic()
        if now - self._last_monitor > MONITOR_INTERVAL:
            self._monitor()
            self._last_monitor = now
        out = self._inline.take_early()
        # wait4(-1) reaps any child of this process: one another local site started is kept for it
        mine = [pid for pid in _REAPED if pid in self.procs] if _REAPED else []
        while self.procs:
            if mine:
                pid = mine.pop()
                status, ru = _REAPED.pop(pid)
            else:
                try:
                    pid, status, ru = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
            p = self.procs.pop(pid, None)
            if p is None:
                _REAPED[pid] = (status, ru)  # another site's (or an unknown) child: its owner takes it
                continue
            p.popen.returncode = os.waitstatus_to_exitcode(status)
            for f in p.files:
                f.close()
            if p.pidfd is not None:
                self._ends.unregister(p.pidfd)
                os.close(p.pidfd)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            post = p.staged is not None and p.forced is None and code == 0  # the engine's post-job
            out.append(p.launch.ended(
                exit_code=code,
                signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                fclass=p.forced, reason=p.reason,
                peak_rss_mb=job_peak_mb(p.peak_rss, ru.ru_maxrss, p.baseline_kb), cpu_s=max(ru.ru_utime + ru.ru_stime, p.tree_cpu),
                host=self.host,
                staged=p.staged if post else None, started=p.started,
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
        self.kill_orphans(run)

    @staticmethod
    def kill_orphans(run: Run) -> None:
        """Every process of the run, found by its environment marker (no backend needed)."""
        kill_run_processes(str(run.submit_dir))

    def close(self) -> None:
        for p in self.procs.values():
            if p.pidfd is not None:
                os.close(p.pidfd)
                p.pidfd = None
