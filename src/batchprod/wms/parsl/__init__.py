"""Parsl as a backend (extra ``batchprod[parsl]``): a HighThroughputExecutor, one Python app per attempt.

The provider comes from the site's settings (:class:`ParslSettings`: ``parslProvider: local`` or
``slurm``, ``partition``, ``maxWorkers``, ...). Each backend is one site with its own DataFlowKernel
(never Parsl's global ``parsl.load()``), executor label and run directory, so several Parsl sites run
tasks side by side in one process; ``close()`` cleans up only its own kernel. A backend serves
attempts of any run (each launch names its run). Unlike Rubin's Parsl plugin, report, status, cancel and restart work, because the
orchestrator and the state store do them: Parsl only runs attempts. Each attempt runs in a new
session whose pid is recorded (:mod:`batchprod.wms.parsl.task`), so a walltime kill or a cancel reaches
the whole process tree without touching the Parsl worker.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from batchprod.config.keys import walltime_seconds
from batchprod.errors import ConfigError
from batchprod.execution.commands import BASH
from batchprod.execution.process import kill_group
from batchprod.execution.protocol import KILL_SIGNALS
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.wms.base import Backend, BaseWmsService, Capacity, Ended, Launch, SiteUnavailable
from batchprod.wms.inline import InlineJobs, job_variables, wrapper_usage, write_wrapper_spec
from batchprod.wms.local.backend import kill_run_processes
from batchprod.wms.settings import Count, SiteSettings, Text, run_site_settings


def _provider(v: Any) -> str:
    s = str(v) if isinstance(v, str) else None
    if s not in ("local", "slurm"):
        raise ValueError(f"expected local or slurm, got {v!r}")
    return s


class ParslSettings(SiteSettings):
    """``site.<name>`` of a Parsl site (a HighThroughputExecutor with one block)."""

    wms = "parsl"
    provider: Annotated[Literal["local", "slurm"], BeforeValidator(_provider)] = Field(
        "local", alias="parslProvider", description="where Parsl's workers run: local (this machine) or slurm "
        "(one Slurm job holding the workers)")
    max_workers: Count | None = Field(None, description="workers (attempts running at once; default: this "
                                      "machine's cores)")
    partition: Text | None = Field(None, description="Slurm partition of the workers' block (provider slurm)")
    account: Text | None = Field(None, description="Slurm account of the workers' block (provider slurm)")
    walltime: Annotated[int, BeforeValidator(walltime_seconds)] = Field(
        3600, description="walltime of the workers' block (provider slurm; seconds or HH:MM:SS)")
    run_dir: Text | None = Field(None, description="where Parsl writes its own logs (default: the run's "
                                 "submit directory/parsl, or a temporary directory for a site not built for a run)")


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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

    def __init__(self, settings: ParslSettings, run_dir: str | Path | None = None) -> None:
        self.settings = settings
        try:
            from parsl.app.python import PythonApp
            from parsl.config import Config
            from parsl.dataflow.dflow import DataFlowKernel
            from parsl.executors import HighThroughputExecutor
            from parsl.providers import LocalProvider, SlurmProvider
        except ImportError:
            raise ConfigError("wmsServiceClass 'parsl': install the extra: pip install 'batchprod[parsl]'") from None
        self.tasks: dict[str, _Task] = {}
        self._n = 0
        self._inline = InlineJobs()
        self._closed = False
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = f"{bindir}:{os.environ.get('PATH', '')}"  # Parsl starts its interchange by name
        workers = settings.max_workers or os.cpu_count() or 1
        worker_init = f"export PATH={shlex.quote(bindir)}:$PATH"
        if settings.provider == "slurm":
            from parsl.launchers import SingleNodeLauncher

            provider: Any = SlurmProvider(partition=settings.partition, account=settings.account, nodes_per_block=1,
                                          init_blocks=1, min_blocks=1, max_blocks=1, walltime=_hms(settings.walltime),
                                          launcher=SingleNodeLauncher(), worker_init=worker_init, exclusive=False)
        else:
            provider = LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init)
        if run_dir is None:
            run_dir = settings.run_dir or tempfile.mkdtemp(prefix=f"batchprod-parsl-{settings.site}-")
        self.run_dir = Path(run_dir)
        self.label = f"batchprod-{settings.site}"
        config = Config(
            executors=[HighThroughputExecutor(label=self.label, address="127.0.0.1", max_workers_per_node=workers,
                                              provider=provider)],
            run_dir=str(self.run_dir), strategy="none", initialize_logging=False,
            # Parsl starts the first block at its first strategy pass, one period after load (default
            # 5 s, measured as most of a 10,000-job run's start-up). A local block's status is a file
            # read; a Slurm block's is an squeue, and its queue wait dwarfs the period anyway.
            strategy_period=1 if settings.provider == "local" else 5,
        )
        self.dfk = DataFlowKernel(config)  # this site's own kernel: never parsl.load()'s global one
        from batchprod.wms.parsl.task import run_attempt

        self.app = PythonApp(run_attempt, data_flow_kernel=self.dfk, executors=[self.label])

    def start(self, launches: Sequence[Launch]) -> list[str]:
        """One Python app per launch; SiteUnavailable (nothing started) if the executor has given up."""
        self._check_executor()
        handles = []
        for launch in launches:
            pid_path = Path(str(launch.result).replace(".result.json", ".pid"))
            env = job_variables(launch)
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

    def _check_executor(self) -> None:
        """SiteUnavailable when the executor has given up (its block cannot start, the interchange died)."""
        ex = self.dfk.executors.get(self.label)
        if ex is not None and getattr(ex, "bad_state_is_set", False):
            why = getattr(ex, "executor_exception", None)
            raise SiteUnavailable(self.settings.site, f"Parsl executor failed: {why}")

    def poll(self) -> list[Ended]:
        self._check_executor()
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
            u = wrapper_usage(t.launch) if t.staged is None else {}  # only the Python wrapper measures itself
            ended = Ended.from_usage(t.launch, code, sig, u, t.forced, t.reason, host)
            if t.staged is not None and t.forced is None and code == 0:  # post-job is the engine's
                ended.staged, ended.started = t.staged, t.started
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
        """Clean up this site's kernel only (its executor, its block); other sites go on."""
        if self._closed:
            return
        self._closed = True
        self.dfk.cleanup()


class ParslService(BaseWmsService):
    """Runs a generic workflow through Parsl (HighThroughputExecutor)."""

    name = "parsl"
    settings_model = ParslSettings

    def site_backend(self, settings: ParslSettings) -> Backend:  # type: ignore[override]
        return ParslBackend(settings, run_dir=settings.run_dir)

    def backend(self, run: Run) -> Backend:
        settings = run_site_settings(run, ParslSettings)
        return ParslBackend(settings, run_dir=settings.run_dir or run.submit_dir / "parsl")

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        kill_run_processes(str(run.submit_dir))  # no need to start an executor to stop processes


__all__ = ["ParslBackend", "ParslService", "ParslSettings"]
