"""The core package and the dispatcher never import Rubin (lsst) code: importing every batchprod module
and running the engine's imports leaves no ``lsst`` module loaded (the ``rubin`` extra is optional)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import batchprod
for m in pkgutil.walk_packages(batchprod.__path__, "batchprod."):
    if ".migrations" in m.name or m.name.endswith("__main__"):  # (alembic scripts run under alembic)
        continue
    importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n == "lsst" or n.startswith("lsst.")))
"""


def test_no_lsst_module_is_imported() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
