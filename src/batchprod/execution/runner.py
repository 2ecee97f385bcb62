"""The job wrapper that runs on the compute side, in three phases.

* pre-job: stage-in check (every input exists, else an ``infrastructure`` failure);
* in-job: every quantum of the job runs its Python function or shell command, writing its outputs
  into an attempt-scoped staging directory (later quanta of the job read them there);
* post-job: outputs are checksummed, a manifest is written (``.pending``), outputs are renamed into
  place, and the manifest is committed (renamed to ``result.json``). A killed attempt leaves at most
  staged files nobody reads; a kill during publication is rolled forward by restart.

Started as ``python -m batchprod.execution.runner`` with the job spec (JSON) on stdin.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchprod.execution.commands import BASH, STRICT, one_line, quantum_what, render_command
from batchprod.execution.protocol import (
    EXIT_INFRASTRUCTURE,
    EXIT_MEMORY_ERROR,
    EXIT_MISSING_OUTPUT,
    KILL_SIGNALS,
    MissingOutput,
    StageError,
    _write_json,
    collect_outputs,
    final_outputs,
    finish_attempt,
    stage_in_check,
    staged_quantum,
    staging_map,
)
from batchprod.pipeline.context import QuantumContext, Ref


def load_function(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _context(q: dict[str, Any]) -> QuantumContext:
    inputs: dict[str, list[Ref]] = {}
    for r in q["inputs"]:
        inputs.setdefault(r["dataset_type"], []).append(Ref(r["dataset_type"], r["data_id"], Path(r["path"])))
    outputs = {r["dataset_type"]: Ref(r["dataset_type"], r["data_id"], Path(r["path"])) for r in q["outputs"]}
    return QuantumContext(q["label"], q["data_id"], inputs, outputs, q.get("config") or {})


def _kill_signal(rc: int) -> int | None:
    """The kill signal a command's status reports: -N from Python (killed itself), or 128+N from a
    shell whose payload was killed (None: an ordinary exit, or a signal that means a crash)."""
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    return sig if sig in KILL_SIGNALS else None


def _run_command(cmd: str, what: str) -> None:
    """Run one command with bash's strict mode (a failed or killed part of ``a; b`` or ``a | b``
    fails the command); a payload killed by a kill signal makes the wrapper die of it too."""
    print(f"+ {cmd}", flush=True)
    code = _exit_code(subprocess.call([BASH, "-c", f"{STRICT}\n{cmd}"]), what)
    if code:
        print(f"error: {what}: command exited with code {code}: {one_line(cmd)}", file=sys.stderr, flush=True)
        raise SystemExit(code)


def _exit_code(rc: int, what: str) -> int:
    """A payload's exit code from its status; a payload killed by a kill signal kills the wrapper
    with it (stopped from outside: the orchestrator must see a kill, not an error)."""
    if rc == 0:
        return 0
    sig = _kill_signal(rc)
    if sig is not None:
        print(f"error: {what}: payload killed by {signal.Signals(sig).name}", file=sys.stderr, flush=True)
        if sig != signal.SIGKILL:  # (its handler cannot be set)
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGKILL)  # the signal was blocked or ignored: still a kill
    return rc if rc > 0 else 128 - rc


def run_quantum(q: dict[str, Any], staged: dict[str, str]) -> list[dict[str, Any]]:
    """Run one quantum into staging; returns its output records (final and staged paths)."""
    lq = staged_quantum(q, staged)
    for r in lq["outputs"]:
        try:
            Path(r["path"]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"stage-in: cannot make the staging directory for {r['dataset_type']}: {exc}") from None
    if q.get("python"):
        load_function(q["python"])(_context(lq))
    else:
        _run_command(render_command(q["command"], lq), quantum_what(q))
    try:
        return collect_outputs(q, staged)
    except MissingOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_MISSING_OUTPUT) from None


class MemoryGuard:
    """On batch systems without memory enforcement the wrapper guards itself: it samples the RSS of
    its whole process tree and, over the request, kills the payload and exits as ``oom``."""

    def __init__(self, limit_mb: int, interval: float = 0.1) -> None:
        import threading

        self.limit_mb = limit_mb
        self.interval = interval
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        from batchprod.execution.process import tree_rss_mb

        me = psutil.Process()
        while True:
            try:
                mb = tree_rss_mb(me)
            except psutil.NoSuchProcess:
                return
            self.peak_mb = max(self.peak_mb, mb)
            if mb > self.limit_mb:
                print(f"error: oom: process tree used {mb:.0f} MB > requestMemory {self.limit_mb} MB",
                      file=sys.stderr, flush=True)
                for p in me.children(recursive=True):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        continue
                os._exit(EXIT_MEMORY_ERROR)
            time.sleep(self.interval)


def _own_peak_kb() -> int:
    """Peak RSS of this process since it started the wrapper (KiB): the high-water mark of its own
    address space. ``ru_maxrss`` of RUSAGE_SELF is not that: it also holds the peak of the address
    space the process had before ``exec`` — its parent's (a Parsl worker, a batch shell)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _write_usage(path: str, guard: MemoryGuard | None, spec: dict[str, Any]) -> None:
    """Resource use of the attempt and the provenance context it ran in (host, software, environment),
    for backends whose jobs run elsewhere than the orchestrator."""
    import resource
    import socket

    from batchprod.execution.capture import context_hash, context_record, payload_modules

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # the payload's processes were started by this one: their peaks are the job's own
    peak = max(_own_peak_kb(), kids.ru_maxrss) / 1024
    if guard is not None:
        peak = max(peak, guard.peak_mb)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    final = spec.get("final") or {}
    record = context_record(payload_modules([*spec["quanta"], final]))
    with contextlib.suppress(OSError):
        _write_json(path, {"peak_rss_mb": peak, "cpu_s": cpu, "host": socket.gethostname(),
                           "context": context_hash(record), "context_record": record})


def spec_from_run(submit_dir: str, job_index: int | None, attempt: str) -> dict[str, Any]:
    """Build a job's spec from the run's workflow file (batch systems that start the wrapper with a
    job index instead of a spec: one submit file per group, not one file per job)."""
    from batchprod.execution.rundir import attempt_paths, load_workflow
    from batchprod.workflow.generic import FinalJob

    wf = load_workflow(Path(submit_dir))
    if job_index is None:
        spec = wf.final_spec()
        if spec is None:
            raise SystemExit(f"{submit_dir}: this run has no final job")
        label = name = FinalJob.NAME
    else:
        spec = wf.job_spec(job_index)
        label, name = wf.group(job_index).name, spec["name"]
    spec.update(attempt=attempt, result_path=str(attempt_paths(Path(submit_dir), label, name, attempt)[2]))
    attempt_paths(Path(submit_dir), label, name, attempt)[2].parent.mkdir(parents=True, exist_ok=True)
    return spec


def _read_spec(argv: list[str]) -> dict[str, Any]:
    import argparse

    if not argv:
        return json.loads(sys.stdin.read())
    ap = argparse.ArgumentParser(prog="python -m batchprod.execution.runner")
    ap.add_argument("--submit-dir", required=True)
    ap.add_argument("--job-index", type=int)
    ap.add_argument("--final", action="store_true")
    ap.add_argument("--attempt", default="1")
    a = ap.parse_args(argv)
    if a.final == (a.job_index is not None):
        ap.error("give exactly one of --job-index or --final")
    return spec_from_run(a.submit_dir, a.job_index, a.attempt)


def main() -> int:
    spec = _read_spec(sys.argv[1:])
    if spec.get("new_session"):
        # under an executor that shares its process group (Parsl workers): a group of our own, so a
        # kill reaches the payload's whole tree and nothing else
        with contextlib.suppress(OSError):
            os.setsid()
    if spec.get("pid_path"):
        with contextlib.suppress(OSError):
            Path(spec["pid_path"]).write_text(str(os.getpid()))
    guard = MemoryGuard(int(spec["memory_mb"])) if spec.get("enforce_memory") and spec.get("memory_mb") else None
    usage = spec.get("usage_path")
    try:
        return _main(spec)
    finally:
        if usage:
            _write_usage(usage, guard, spec)


def _butler_job(spec: dict[str, Any]) -> int:
    """A Rubin job under the wrapper (an HTCondor export runs every job this way): its script, then
    the Butler protocol's post-job (summary -> result)."""
    from batchprod.execution.butler import ButlerJobs
    from batchprod.execution.commands import shell_script

    t0 = time.time()
    script = shell_script(spec, {})
    assert script is not None
    code = _exit_code(subprocess.call([BASH, "-c", script]), spec["name"])
    if code:
        return code  # (the job's script said which command failed and how)
    code, _ = ButlerJobs().post_job(spec, Path("/dev/stderr"), {}, t0)
    return code


def _main(spec: dict[str, Any]) -> int:
    if spec.get("protocol") == "butler" and not spec.get("final"):
        return _butler_job(spec)
    t0 = time.time()
    staged = staging_map(spec)
    outputs: list[dict[str, Any]] = []
    try:
        stage_in_check(spec)
        if spec.get("final"):
            final = spec["final"]
            if final.get("python"):
                load_function(final["python"])(spec)
            else:
                _run_command(final["command"], "finalJob")
            outputs.extend(final_outputs(final))
        for q in spec["quanta"]:
            print(f"quantum {quantum_what(q)}", flush=True)
            outputs.extend(run_quantum(q, staged))
        finish_attempt(spec, outputs, time.time() - t0)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    except MemoryError:
        traceback.print_exc()
        return EXIT_MEMORY_ERROR
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
