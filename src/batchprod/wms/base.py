"""The WMS plugin interface: a small abstract class; implementations register as entry points.

A WMS runs a prepared run (its generic workflow) and can cancel it. Status, report and restart read
the run's state store, which every backend keeps up to date, so they are not the plugin's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from batchprod.errors import ConfigError

if TYPE_CHECKING:
    from batchprod.execution.run import Run
    from batchprod.execution.states import RunState

#: progress callback: counts of jobs per state
Progress = Callable[[dict[str, int]], None]


class BaseWmsService(ABC):
    """One workload management system (local executor, Slurm, Parsl, ...)."""

    name: str = "base"

    @abstractmethod
    def execute(self, run: Run, progress: Progress | None = None) -> RunState:
        """Run every not-yet-succeeded job of the run to completion, in the foreground."""

    @abstractmethod
    def cancel(self, run: Run) -> None:
        """Stop every running job of the run and mark it CANCELLED."""


def get_wms(name: str) -> BaseWmsService:
    """A WMS by entry-point name (``local``) or ``module:Class``."""
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"wmsServiceClass '{name}': cannot load: {exc}") from None
        return cls()
    eps = {ep.name: ep for ep in entry_points(group="batchprod.wms")}
    if name not in eps:
        raise ConfigError(f"wmsServiceClass '{name}': unknown WMS (installed: {', '.join(sorted(eps))})")
    return eps[name].load()()
