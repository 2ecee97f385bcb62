"""Finding a WMS plugin: by entry-point name (``local``, ``slurm``) or by class path.

Class paths are accepted as ``module:Class`` and, as ctrl_bps writes them, ``package.module.Class``.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

from batchprod.config.imports import resolve_python_ref
from batchprod.errors import ConfigError
from batchprod.wms.base import BaseWmsService


def get_wms(name: str) -> BaseWmsService:
    """A WMS by entry-point name (``local``), ``module:Class`` or ``package.module.Class`` (ctrl_bps's
    form); anything that is not a concrete BaseWmsService (``os:system``, a module that raises on
    import) is a one-line ConfigError."""
    if ":" in name or "." in name:
        ref = name if ":" in name else ":".join(name.rsplit(".", 1))
        try:
            cls: Any = resolve_python_ref(ref)
        except ValueError as exc:
            raise ConfigError(f"wmsServiceClass '{name}': {exc}") from None
    else:
        eps = {ep.name: ep for ep in entry_points(group="batchprod.wms")}
        if name not in eps:
            raise ConfigError(f"wmsServiceClass '{name}': unknown WMS (installed: {', '.join(sorted(eps))})")
        try:
            cls = eps[name].load()
        except Exception as exc:  # noqa: BLE001 (a broken plugin install)
            raise ConfigError(f"wmsServiceClass '{name}': plugin cannot load: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseWmsService)) or inspect.isabstract(cls):
        raise ConfigError(f"wmsServiceClass '{name}' is not a WMS service class "
                          "(expected a subclass of batchprod.wms.base.BaseWmsService)")
    return cls()
