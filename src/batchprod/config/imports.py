"""Checking, at load time, that a Python reference in a config or pipeline names something real.

``python: mod:func`` (a pipeline task or ``finalJob.python``) and ``wmsServiceClass: mod:Class``
are imported when the run is prepared, so a typo is one line naming the file and key now, not a
traceback in every job later.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from batchprod.config.keys import PYTHON_REF_RE, WMS_CLASS_RE
from batchprod.config.safe_yaml import one_line
from batchprod.errors import ConfigError


def _import(module: str) -> Any:
    """Import a module, or ValueError saying why not (never the module's own exception)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):
        spec = None  # a parent package is missing or is not a package
    except BaseException as exc:  # a parent package that fails while importing
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ValueError(f"cannot import module '{module}': {type(exc).__name__}: {one_line(exc, 150)}") from None
    if spec is None:
        raise ValueError(f"module '{module}' not found (is it installed, or on PYTHONPATH?)")
    try:
        return importlib.import_module(module)
    except BaseException as exc:  # SystemExit included: a payload module is not ours to trust
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ValueError(f"cannot import module '{module}': {type(exc).__name__}: {one_line(exc, 150)}") from None


def resolve_python_ref(ref: str) -> Any:
    """The object a 'module:attr.attr' reference names, or ValueError saying what is wrong."""
    m = PYTHON_REF_RE.fullmatch(ref)
    if not m:
        raise ValueError(f"expected 'module:function', got {ref!r}")
    module, attr = m.groups()
    obj = _import(module)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:
            raise ValueError(f"module '{module}' has no '{attr}'") from None
    return obj


def check_python_ref(ref: str, where: str) -> None:
    """A payload 'module:function' imports and is callable; else ConfigError '<where>: ...'."""
    try:
        obj = resolve_python_ref(ref)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not callable(obj):
        raise ConfigError(f"{where}: '{ref}' is not a function")


def check_wms_class(name: str, where: str) -> None:
    """A WMS is an entry-point name (``local``), ``module:Class`` or ctrl_bps's ``package.module.Class``.
    Only the shape is checked here: the class itself is loaded and checked by the WMS registry when
    the run is prepared (the config layer knows nothing of WMS plugins)."""
    if not WMS_CLASS_RE.fullmatch(name):
        raise ConfigError(f"{where}: expected a WMS name (e.g. local, slurm) or 'module:Class', got {name!r}")
