"""Parsl as a backend (extra ``batchprod[parsl]``): a HighThroughputExecutor, one Python app per attempt.

The provider comes from the site config (``parslProvider: local`` or ``slurm``; ``partition``,
``maxWorkers``). Unlike Rubin's Parsl plugin, report, status, cancel and restart work, because the
orchestrator and the state store do them: Parsl only runs attempts. Each attempt runs in a new
session whose pid is recorded (:mod:`batchprod.wms.parsl.task`), so a walltime kill or a cancel reaches
the whole process tree without touching the Parsl worker.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchprod.errors import ConfigError
from batchprod.execution.commands import BASH
from batchprod.execution.process import kill_group
from batchprod.execution.protocol import KILL_SIGNALS
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.wms.base import Backend, BaseWmsService, Capacity, Ended, Launch
from batchprod.wms.inline import InlineJobs, inline_post_job, job_variables, wrapper_usage, write_wrapper_spec
from batchprod.wms.local.backend import kill_run_processes


@dataclass
class ParslSettings:
    provider: str = "local"
    max_workers: int | None = None
    partition: str | None = None
    walltime: str = "01:00:00"

    @classmethod
    def from_run(cls, run: Run) -> ParslSettings:
        provider = run.site("parslProvider", "local")
        if provider not in ("local", "slurm"):
            site = run.config.get("computeSite") or "local"
            raise ConfigError(f"site.{site}.parslProvider: expected local or slurm, got {provider!r}")
        return cls(provider, run.site("maxWorkers"), run.site("partition"))


@dataclass
class _Task:
    launch: Launch
    future: Future[Any]
    pid_path: Path
    forced: FailureClass | None = None
    reason: str | None = None
    term_sent: float | None = None
    staged: dict[str, str] | None = None  # shell-script job: post-job is ours
    started: float = 0.0


class ParslBackend(Backend):
    name = "parsl"

    def __init__(self, run: Run, settings: ParslSettings) -> None:
        self.settings = settings
        try:
            import parsl
            from parsl.app.python import PythonApp
            from parsl.config import Config
            from parsl.executors import HighThroughputExecutor
            from parsl.providers import LocalProvider, SlurmProvider
        except ImportError:
            raise ConfigError("wmsServiceClass 'parsl': install the extra: pip install 'batchprod[parsl]'") from None
        self.run = run
        self.tasks: dict[str, _Task] = {}
        self._n = 0
        self._inline = InlineJobs()
        bindir = os.path.dirname(sys.executable)
        os.environ["PATH"] = f"{bindir}:{os.environ.get('PATH', '')}"  # Parsl starts its interchange by name
        workers = settings.max_workers or os.cpu_count() or 1
        worker_init = f"export PATH={shlex.quote(bindir)}:$PATH"
        if settings.provider == "slurm":
            from parsl.launchers import SingleNodeLauncher

            provider: Any = SlurmProvider(partition=settings.partition, nodes_per_block=1, init_blocks=1,
                                          min_blocks=1, max_blocks=1, walltime=settings.walltime,
                                          launcher=SingleNodeLauncher(), worker_init=worker_init, exclusive=False)
        else:
            provider = LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init)
        config = Config(
            executors=[HighThroughputExecutor(label="batchprod", address="127.0.0.1", max_workers_per_node=workers,
                                              provider=provider)],
            run_dir=str(run.submit_dir / "parsl"), strategy="none", initialize_logging=False,
            # Parsl starts the first block at its first strategy pass, one period after load (default
            # 5 s, measured as most of a 10,000-job run's start-up). A local block's status is a file
            # read; a Slurm block's is an squeue, and its queue wait dwarfs the period anyway.
            strategy_period=1 if settings.provider == "local" else 5,
        )
        self.dfk = parsl.load(config)
        from batchprod.wms.parsl.task import run_attempt

        self.app = PythonApp(run_attempt, executors=["batchprod"])

    def start(self, launches: Sequence[Launch]) -> list[str]:
        handles = []
        for launch in launches:
            pid_path = Path(str(launch.result).replace(".result.json", ".pid"))
            env = job_variables(launch, str(self.run.submit_dir))
            script, staged, ok = self._inline.plan(launch)
            self._n += 1
            handle = f"parsl-{self._n}"
            if not ok:
                handles.append(handle)
                continue
            if script is not None:
                # commands only: no Python wrapper per job; pre/post-job here, as on the local backend
                argv, stdin, pid = [BASH, "-c", script], None, str(pid_path)
            else:
                stdin = write_wrapper_spec(launch, new_session=True, pid_path=str(pid_path))
                argv, pid = [sys.executable, "-m", "batchprod.execution.runner"], None
            fut = self.app(argv, env, str(launch.stdout), str(launch.stderr), stdin, pid)
            self.tasks[handle] = _Task(launch, fut, pid_path, staged=staged if script is not None else None,
                                       started=time.time())
            handles.append(handle)
        return handles

    def active(self) -> int:
        return len(self.tasks) + len(self._inline.early)

    def capacity(self) -> Capacity:
        # keep Parsl's queue fed: a few tasks per worker in flight hide the submit/result round trip
        return Capacity(cores=4 * (self.settings.max_workers or os.cpu_count() or 1))

    def wait(self, timeout: float) -> None:
        """Until a task's future completes (few are in flight: the budget keeps ~4 per worker)."""
        if self._inline.early:
            return
        if not self.tasks:
            time.sleep(timeout)
            return
        futures.wait([t.future for t in self.tasks.values()], timeout=max(timeout, 0.1),
                     return_when=futures.FIRST_COMPLETED)

    def running_since(self, handle: str) -> float | None:
        t = self.tasks.get(handle)
        try:
            return t.pid_path.stat().st_mtime if t else None
        except OSError:
            return None

    def poll(self) -> list[Ended]:
        out = self._inline.take_early()
        for handle, t in list(self.tasks.items()):
            if not t.future.done():
                if t.forced is not None and t.term_sent is None and t.pid_path.exists():
                    self.kill(handle, t.forced, t.reason or "")  # asked to stop before it had started
                    t.term_sent = t.term_sent or time.monotonic()
                continue
            del self.tasks[handle]
            code: int | None = None
            sig: int | None = None
            host: str | None = None
            exc = t.future.exception()
            if exc is not None:
                t.forced = t.forced or FailureClass.INFRASTRUCTURE
                t.reason = t.reason or f"infrastructure: Parsl could not run the task: {exc}"
            else:
                rc, host = t.future.result()
                if rc < 0:
                    sig = -rc
                elif rc > 128 and (rc - 128) in KILL_SIGNALS:
                    sig = rc - 128  # the shell reports its child's death by signal
                else:
                    code = rc
            outputs = None
            if t.staged is not None and t.forced is None and code == 0:
                code, outputs = inline_post_job(t.launch, t.staged, t.started)
            u = wrapper_usage(t.launch) if t.staged is None else {}  # only the Python wrapper measures itself
            ended = Ended.from_usage(t.launch, code, sig, u, t.forced, t.reason, host)
            ended.outputs = outputs
            out.append(ended)
        return out

    def kill(self, handle: str, fclass: FailureClass, reason: str) -> None:
        t = self.tasks.get(handle)
        if t is None:
            return
        if t.forced is None:
            t.forced, t.reason = fclass, reason
        try:
            pid = int(t.pid_path.read_text())
        except (OSError, ValueError):
            return  # not started yet: Parsl cannot cancel a queued task; poll() kills it when it starts
        if fclass == FailureClass.CANCELLED:
            t.term_sent = time.monotonic()
            kill_group(pid, signal.SIGTERM)
        else:
            kill_group(pid, signal.SIGKILL)

    def escalate(self, grace: float) -> None:
        now = time.monotonic()
        for t in self.tasks.values():
            if t.term_sent is not None and now - t.term_sent > grace:
                try:
                    kill_group(int(t.pid_path.read_text()), signal.SIGKILL)
                except (OSError, ValueError):
                    continue

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        kill_run_processes(str(run.submit_dir))

    def close(self) -> None:
        import parsl

        try:
            self.dfk.cleanup()
        finally:
            parsl.clear()


class ParslService(BaseWmsService):
    """Runs a generic workflow through Parsl (HighThroughputExecutor)."""

    name = "parsl"

    def backend(self, run: Run) -> Backend:
        return ParslBackend(run, ParslSettings.from_run(run))

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        kill_run_processes(str(run.submit_dir))  # no need to start an executor to stop processes



__all__ = ["ParslBackend", "ParslService", "ParslSettings"]
