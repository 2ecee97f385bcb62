"""Slurm as a backend: batchprod keeps the DAG (like DAGMan) and submits jobs whose parents are done.

* one ``sbatch`` per attempt (the batch script on stdin runs the job's commands or the job wrapper), resources mapped to
  ``--cpus-per-task``, ``--mem``, ``--time``; site settings to ``--partition``, ``--account``,
  ``--qos`` and free ``sbatchOptions``;
* one ``squeue`` per poll for *all* active attempts (``-O JobID,State,Reason,exit_code``);
* Slurm outcomes mapped to failure classes: OUT_OF_MEMORY -> oom, TIMEOUT -> timeout,
  PREEMPTED / NODE_FAIL / BOOT_FAIL -> killed (``--no-requeue``: a requeue would rerun an attempt
  behind our back, so preemption ends it and the retry policy decides), non-zero exit -> from the
  wrapper's exit code; our own ``scancel`` -> the class we asked for (cancelled, timeout);
* throttled by ``maxJobs`` (in the scheduler at once) and ``maxIdle`` (pending in it).

A backend is a site, not a run: it serves attempts of any run (each launch names its run's submit
directory; job names carry a prefix per run, so a run's jobs are found in the queue even without
recorded ids).

When the controller cannot be reached (``Unable to contact slurm controller``, a socket timeout, a
client that hangs past its timeout) the backend raises :class:`SiteUnavailable` instead of looking
idle: from ``poll()`` (nothing is lost: the attempts stay known and are asked about again), from
``cleanup_orphans()`` (it cannot promise that nothing runs), and from ``start()`` when its *first*
``sbatch`` fails that way, so nothing of the batch was submitted (early ends of that batch are
withdrawn too: the batch is as if never started). If the controller goes away in the middle of a
batch, the jobs already submitted keep their handles, and the launch that failed and every launch
after it get the handle ``-`` and end as ``infrastructure`` ("site unavailable") at the next poll:
the engine retries them later without spending their retry budget, and no submitted job is
unknown. An ``sbatch`` that the controller refuses (a bad partition or account) raises
:class:`SubmitRefused` when it is the batch's first submission (the dispatcher holds it against the
site, or stops a run that has no other), and otherwise ends that attempt as ``infrastructure``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from batchprod.errors import ConfigError, RunError
from batchprod.execution.protocol import EXIT_INFRASTRUCTURE
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.wms.base import (
    Backend,
    BaseWmsService,
    Capacity,
    Ended,
    Launch,
    SiteUnavailable,
    SubmitRefused,
)
from batchprod.wms.inline import InlineJobs, job_variables, wrapper_usage, write_wrapper_spec
from batchprod.wms.settings import Count, Seconds, SiteSettings, Text, run_site_settings

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
LOST = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
WALLTIME_MARGIN = 60  # seconds added to --time so our own walltime check (exact) normally wins
VANISHED_AFTER = 3  # polls an attempt may be missing from squeue before it counts as lost


def _sbatch_options(v: Any) -> str:
    text = "" if v is None else str(v)
    try:
        shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot split into options: {exc}") from None
    return text


class SlurmSettings(SiteSettings):
    """``site.<name>`` of a Slurm site."""

    wms = "slurm"
    partition: Text | None = Field(None, description="sbatch --partition (default: the cluster's)")
    account: Text | None = Field(None, description="sbatch --account")
    qos: Text | None = Field(None, description="sbatch --qos")
    sbatch_options: Annotated[str, BeforeValidator(_sbatch_options)] = Field(
        "", description="more sbatch options, split as a shell would ('--constraint=haswell --exclusive')")
    max_jobs: Count = Field(1000, description="attempts in the scheduler at once (pending + running)")
    max_idle: Count = Field(200, description="of which pending in its queue (late binding: few stranded)")
    poll_interval: Seconds = Field(1.0, description="seconds between two squeue calls (one for all attempts)")
    command_timeout: Seconds = Field(120.0, description="seconds an sbatch/squeue call may take before the "
                                     "site counts as unavailable")


#: what Slurm clients print when the controller does not answer (the site is down, not the job)
UNREACHABLE = ("unable to contact slurm controller", "socket timed out", "connection refused",
               "zero bytes were transmitted or received", "communication connection failure",
               "slurm_receive_msg", "connect failure", "slurmctld not responding")


def _unreachable(text: str) -> bool:
    low = text.lower()
    return any(u in low for u in UNREACHABLE)


class _SiteDown(Exception):
    """A Slurm client could not reach the controller (turned into SiteUnavailable by the caller)."""


def _run_cmd(args: list[str], what: str, input_text: str | None = None, timeout: float = 120.0) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, input=input_text, timeout=timeout)
    except FileNotFoundError:
        raise RunError(f"{what}: '{args[0]}' not found; is the Slurm client installed?") from None
    except subprocess.TimeoutExpired:
        raise _SiteDown(f"{what}: no answer within {timeout:g}s") from None
    if p.returncode != 0:
        msg = p.stderr.strip() or p.stdout.strip()
        if _unreachable(msg):
            raise _SiteDown(f"{what}: {msg.splitlines()[-1] if msg else p.returncode}")
        one = "; ".join(ln.strip() for ln in msg.splitlines() if ln.strip())  # one line for the operator
        raise RunError(f"{what} failed ({p.returncode}): {one}")
    return p.stdout


def _scancel(ids: Sequence[str], timeout: float) -> None:
    """scancel; a controller that does not answer is seen at the next poll (SiteUnavailable)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["scancel", *ids], capture_output=True, timeout=timeout)


def run_prefix(run: str) -> str:
    """The job-name prefix of one run's attempts (its submit directory, hashed)."""
    return "bp" + hashlib.blake2b(run.encode(), digest_size=4).hexdigest()


def time_option(seconds: int) -> str:
    """Slurm --time in whole minutes (its granularity), with a margin over the requested walltime."""
    return str(max(1, math.ceil((seconds + WALLTIME_MARGIN) / 60)))


@dataclass
class _Sub:
    launch: Launch
    forced: FailureClass | None = None
    reason: str | None = None
    missing: int = 0
    state: str = "PENDING"
    running_since: float | None = None
    staged: dict[str, str] | None = None  # shell-script job: post-job is ours
    submitted: float = 0.0
    node: str | None = None  # where Slurm ran it (squeue NodeList)


class SlurmBackend(Backend):
    """A Slurm site: attempts of any run, one sbatch each, one squeue per poll for all of them."""

    name = "slurm"

    def __init__(self, settings: SlurmSettings) -> None:
        self.settings = settings
        self.subs: dict[str, _Sub] = {}
        self._inline = InlineJobs()
        self._last_poll = 0.0
        self.pending = 0
        self._prefixes: dict[str, str] = {}

    def prefix(self, run: str) -> str:
        """A job-name prefix unique to a run: finds its jobs in the queue even without recorded ids."""
        p = self._prefixes.get(run)
        if p is None:
            p = self._prefixes[run] = run_prefix(run)
        return p

    def _unavailable(self, exc: _SiteDown) -> SiteUnavailable:
        return SiteUnavailable(self.settings.site, str(exc))

    # -- submit --------------------------------------------------------------------------------------
    def sbatch_args(self, launch: Launch) -> list[str]:
        """sbatch options for one attempt; the batch script itself comes on stdin (:meth:`batch_script`)."""
        s = self.settings
        # plain --export=ALL: a list of variables there (ALL,K=V) makes slurmd build a login environment
        # per job (bash -l ... slurmstepd getenv), measured here at ~0.15 s of CPU and 6x fewer jobs/s
        args = ["sbatch", "--parsable", "--no-requeue", "--export=ALL",
                f"--job-name={self.prefix(launch.run)}.{launch.name}"[:200],
                f"--output={launch.stdout}", f"--error={launch.stderr}", f"--cpus-per-task={launch.cores}",
                f"--mem={launch.memory}M"]
        if launch.walltime:
            args.append(f"--time={time_option(launch.walltime)}")
        if launch.disk:
            args.append(f"--tmp={launch.disk}M")
        for opt, val in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if val:
                args.append(f"--{opt}={val}")
        return args + shlex.split(s.sbatch_options)

    def batch_script(self, launch: Launch, body: str) -> str:
        """The job's batch script: its environment as exports, then ``body``."""
        env = job_variables(launch)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        return f"#!/bin/bash\n{exports}{body}"  # job scripts use bash strict mode

    def start(self, launches: Sequence[Launch]) -> list[str]:
        """One sbatch per launch. See the module's doc for what happens when the controller is gone:
        nothing submitted -> SiteUnavailable; part of the batch submitted -> those keep their
        handles, the rest end as ``infrastructure``."""
        handles: list[str] = []
        early_before = len(self._inline.early)
        submitted = 0
        down: str | None = None
        for launch in launches:
            if down is not None:
                self._site_down_end(launch, down)
                handles.append("-")
                continue
            script, staged, ok = self._inline.plan(launch)
            if not ok:
                handles.append("-")
                continue
            if script is not None:
                # commands only: the batch script is the commands themselves, no Python wrapper per job
                # (it costs more CPU than Slurm's own per-job work); pre/post-job are done here. Memory
                # is then Slurm's to enforce (cgroups: OUT_OF_MEMORY -> oom).
                body = script
            else:
                spec_path = write_wrapper_spec(launch)
                body = f"exec {shlex.quote(sys.executable)} -m batchprod.execution.runner < {shlex.quote(spec_path)}\n"
            try:
                out = _run_cmd(self.sbatch_args(launch), f"sbatch {launch.name}", self.batch_script(launch, body),
                               timeout=self.settings.command_timeout)
            except (_SiteDown, RunError) as exc:
                if submitted == 0:  # nothing of this batch is in the queue: the batch never started
                    del self._inline.early[early_before:]
                    if isinstance(exc, _SiteDown):
                        raise self._unavailable(exc) from None
                    raise SubmitRefused(self.settings.site, str(exc)) from None
                if isinstance(exc, _SiteDown):
                    down = str(exc)
                    self._site_down_end(launch, down)
                else:
                    self._inline.fail_early(launch, f"infrastructure: {exc}")
                handles.append("-")
                continue
            job_id = out.strip().split(";")[0]
            self.subs[job_id] = _Sub(launch, staged=staged if script is not None else None, submitted=time.time())
            self.pending += 1
            submitted += 1
            handles.append(job_id)
        return handles

    def _site_down_end(self, launch: Launch, why: str) -> None:
        self._inline.early.append(launch.ended(EXIT_INFRASTRUCTURE, None, fclass=FailureClass.INFRASTRUCTURE,
                                               reason=f"infrastructure: site '{self.settings.site}' unavailable: {why}"))

    def active(self) -> int:
        return len(self.subs) + len(self._inline.early)

    def wait(self, timeout: float) -> None:
        """Until the next squeue is due: nothing can end between polls, so waking every few ms
        would only burn the orchestrator's CPU for the length of a long run."""
        if self._inline.early:
            return
        due = self._last_poll + self.settings.poll_interval - time.monotonic()
        time.sleep(min(max(timeout, due), self.settings.poll_interval))

    def running_since(self, handle: str) -> float | None:
        sub = self.subs.get(handle)
        return sub.running_since if sub else None

    def capacity(self) -> Capacity:
        # the scheduler owns cores and memory; the engine only throttles (maxJobs, maxIdle)
        return Capacity(None, None, self.settings.max_jobs, self.settings.max_idle)

    def queued(self) -> int:
        return self.pending

    # -- poll ----------------------------------------------------------------------------------------
    def query(self, ids: Sequence[str]) -> dict[str, tuple[str, str, int | None, str]]:
        """job id -> (state, reason, raw wait status, node) for the given ids, in one squeue call."""
        if not ids:
            return {}
        try:
            out = _run_cmd(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-O",
                            "JobID:|,State:|,Reason:|,exit_code:|,NodeList:"], "squeue",
                           timeout=self.settings.command_timeout)
        except _SiteDown as exc:
            raise self._unavailable(exc) from None
        except RunError as exc:
            if "invalid job id" in str(exc).lower():
                return {}  # one id, gone from the controller's memory: missing, as in a longer list
            raise SiteUnavailable(self.settings.site, str(exc)) from None
        res: dict[str, tuple[str, str, int | None, str]] = {}
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 5 and parts[0]:
                code = int(parts[3]) if parts[3].lstrip("-").isdigit() else None
                res[parts[0]] = (parts[1], parts[2], code, parts[4])
        return res

    def poll(self) -> list[Ended]:
        """Every attempt that ended; SiteUnavailable when squeue cannot reach the controller (the
        attempts stay known, nothing is lost; ends of attempts that never started are kept for the
        next poll)."""
        now = time.monotonic()
        if now - self._last_poll < self.settings.poll_interval or not self.subs:
            return self._inline.take_early()
        self._last_poll = now
        states = self.query(list(self.subs))  # raises SiteUnavailable before anything is taken
        early = self._inline.take_early()
        ended: list[Ended] = []
        pending = 0
        for job_id, sub in list(self.subs.items()):
            st = states.get(job_id)
            if st is None:
                sub.missing += 1
                if sub.missing >= VANISHED_AFTER:
                    del self.subs[job_id]
                    ended.append(self._ended(sub, None, None, FailureClass.KILLED, "vanished from the Slurm queue"))
                continue
            state, reason, status, node = st
            sub.state = state
            sub.node = node or sub.node
            if state == "RUNNING" and sub.running_since is None:
                sub.running_since = time.time()
            if state == "PENDING":
                pending += 1
            if state not in TERMINAL:
                continue
            del self.subs[job_id]
            ended.append(self._from_slurm(sub, state, reason, status))
        self.pending = pending
        return early + ended

    def _ended(self, sub: _Sub, code: int | None, sig: int | None, fclass: FailureClass | None,
               reason: str | None) -> Ended:
        usage = wrapper_usage(sub.launch) if sub.staged is None else {}  # only the wrapper reports usage
        return Ended.from_usage(sub.launch, code, sig, usage, fclass, reason, host=sub.node)

    def _from_slurm(self, sub: _Sub, state: str, reason: str, status: int | None) -> Ended:
        code = sig = None
        if status is not None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            else:
                code = os.WEXITSTATUS(status)
        if sub.forced is not None:
            return self._ended(sub, code, sig, sub.forced, sub.reason)
        if state == "OUT_OF_MEMORY":
            return self._ended(sub, code, sig, FailureClass.OOM, "oom: Slurm OUT_OF_MEMORY")
        if state in ("TIMEOUT", "DEADLINE"):
            return self._ended(sub, code, sig, FailureClass.TIMEOUT, f"timeout: Slurm {state}")
        if state in LOST:
            return self._ended(sub, code, sig, FailureClass.KILLED, f"killed: Slurm {state} ({reason})")
        if state == "CANCELLED":
            return self._ended(sub, code, sig, FailureClass.KILLED, f"killed: cancelled outside batchprod ({reason})")
        ended = self._ended(sub, code, sig, None, None)  # COMPLETED / FAILED: the wrapper's exit code says
        if sub.staged is not None and code == 0:  # a shell-script job: post-job is the engine's
            ended.staged, ended.started = sub.staged, sub.running_since or sub.submitted
        return ended

    # -- kill ----------------------------------------------------------------------------------------
    def kill(self, handle: str, fclass: FailureClass, reason: str) -> None:
        sub = self.subs.get(handle)
        if sub is None:
            return
        if sub.forced is None:
            sub.forced, sub.reason = fclass, reason
        _scancel([handle], 60)

    def kill_many(self, handles: Sequence[str], fclass: FailureClass, reason: str) -> None:
        """One scancel per thousand jobs, not one per job: cancelling 10^5 jobs takes seconds."""
        ids = [h for h in handles if h in self.subs]
        for h in ids:
            sub = self.subs[h]
            if sub.forced is None:
                sub.forced, sub.reason = fclass, reason
        for i in range(0, len(ids), 1000):
            _scancel(ids[i : i + 1000], 120)

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        """Cancel every queued or running Slurm job of this run (by id and by name prefix) and wait
        until none is running, so a restart never has two attempts of one job at once. Raises
        SiteUnavailable when the controller does not answer (it cannot promise that then)."""
        ids = {h for h in handles if h and h != "-"}
        prefix = self.prefix(str(run.submit_dir)) + "."
        try:
            out = _run_cmd(["squeue", "-h", "-o", "%i|%j"], "squeue", timeout=self.settings.command_timeout)
        except _SiteDown as exc:
            raise self._unavailable(exc) from None
        ids.update(i for i, _, n in (line.partition("|") for line in out.splitlines()) if n.startswith(prefix))
        if not ids:
            return
        _scancel(sorted(ids), 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = self.query(sorted(ids))
            if all(s[0] in TERMINAL for s in st.values()):
                return
            time.sleep(0.5)


class SlurmService(BaseWmsService):
    """Runs a generic workflow on a Slurm cluster."""

    name = "slurm"
    settings_model = SlurmSettings

    def site_backend(self, settings: SlurmSettings) -> Backend:  # type: ignore[override]
        if shutil.which("sbatch") is None:
            raise ConfigError("wmsServiceClass 'slurm': sbatch not found on PATH")
        return SlurmBackend(settings)

    def backend(self, run: Run) -> Backend:
        if shutil.which("sbatch") is None:
            raise ConfigError("wmsServiceClass 'slurm': sbatch not found on PATH")
        return SlurmBackend(run_site_settings(run, SlurmSettings))


__all__ = ["SlurmBackend", "SlurmService", "SlurmSettings", "run_prefix", "time_option"]
