"""The embedded local WMS: the default backend."""

from __future__ import annotations

from batchprod.state.run import Run
from batchprod.wms.base import Backend, BaseWmsService
from batchprod.wms.local.backend import LocalBackend


class LocalService(BaseWmsService):
    """Runs every job as a process on this machine, within a cores + memory budget."""

    name = "local"

    def backend(self, run: Run) -> Backend:
        return LocalBackend(str(run.submit_dir), cores=run.site("cores"), memory_mb=run.site("memory"))


__all__ = ["LocalBackend", "LocalService"]
