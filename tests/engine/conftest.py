"""Engine tests' fixtures: a real Rubin repository, pipeline and graph (needs batchprod[rubin])."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def rubin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Repo with 4 detectors, pipeline a -> b -> c (c gathers), b fails on detector 1 until fixed."""
    try:
        import lsst.pipe.base  # noqa: F401
    except ImportError:
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail("the Rubin middleware is required here (BATCHPROD_REQUIRE_ENGINES=1): pip install '.[rubin]'")
        pytest.skip("no Rubin middleware (pip install 'batchprod[rubin]')")
    from batchprod.testing_rubin import fan_in_pipeline, make_qgraph, rubin_repo, write_fixable_task

    mods = tmp_path / "mods"
    switch = write_fixable_task(mods)
    # the jobs find pipetask/butler on PATH and the task module on PYTHONPATH, as a user's environment would
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PYTHONPATH", f"{mods}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    repo = rubin_repo(tmp_path, detectors=4)
    pipeline = fan_in_pipeline(tmp_path / "pipeline.yaml", fail="detector IN (1)")
    qg = make_qgraph(repo, pipeline, tmp_path / "g.qg", output_run="u/test/out/run1")
    return {"root": tmp_path, "repo": repo, "qg": qg, "switch": switch}
