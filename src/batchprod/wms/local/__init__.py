"""The embedded local WMS: the default backend."""

from __future__ import annotations

from batchprod.execution.run import Run
from batchprod.wms.base import Backend, BaseWmsService
from batchprod.wms.local.backend import LocalBackend
from batchprod.wms.orchestrator import Orchestrator


def LocalExecutor(run: Run, **kwargs: object) -> Orchestrator:  # noqa: N802 (reads like the class it builds)
    """The orchestrator driving local processes: the embedded default."""
    return Orchestrator(run, LocalBackend(str(run.submit_dir)), **kwargs)  # type: ignore[arg-type]


class LocalService(BaseWmsService):
    """Runs every job as a process on this machine, within a cores + memory budget."""

    name = "local"

    def backend(self, run: Run) -> Backend:
        return LocalBackend(str(run.submit_dir))


__all__ = ["LocalBackend", "LocalExecutor", "LocalService"]
