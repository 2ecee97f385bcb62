"""Imports point down the data flow only: the import-linter contract in pyproject.toml, run as a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stages_import_only_the_stages_below_them() -> None:
    tool = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run([str(tool), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "1 kept, 0 broken" in p.stdout
