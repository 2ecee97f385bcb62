"""The embedded local WMS: the default backend."""

from __future__ import annotations

from collections.abc import Sequence

from batchprod.state.run import Run
from batchprod.wms.base import Backend, BaseWmsService
from batchprod.wms.local.backend import LocalBackend, LocalSettings
from batchprod.wms.settings import run_site_settings


class LocalService(BaseWmsService):
    """Runs every job as a process on this machine, within a cores + memory budget."""

    name = "local"
    settings_model = LocalSettings

    def site_backend(self, settings: LocalSettings) -> Backend:  # type: ignore[override]
        return LocalBackend(settings)

    def backend(self, run: Run) -> Backend:
        return LocalBackend(run_site_settings(run, LocalSettings))

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        LocalBackend.kill_orphans(run)  # found by environment: no backend needed


__all__ = ["LocalBackend", "LocalService", "LocalSettings"]
