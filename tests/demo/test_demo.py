"""The demo survey end to end on the local executor, with its science check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table

from batchprod.demo import check_catalog, make_demo
from batchprod.state.run import Run


def test_demo_end_to_end_recovers_injected_sources(tmp_path: Path, cli) -> None:
    r = cli("demo", tmp_path / "d", "--visits", "4", "--detectors", "4", "--sources", "30")
    assert r.exit_code == 0, r.output
    assert "catalog check: PASS" in r.output
    (sd,) = [p.parent for p in (tmp_path / "d" / "submit").rglob("state.db")]
    run = Run(sd)
    counts = {j["label"] for j in run.store.jobs()}
    assert counts == {"calibrate", "detect", "coadd", "measure", "finalJob"}
    res = check_catalog(tmp_path / "d", run)
    assert res["matched"] == 30 and res["spurious"] <= 1 and res["rms_px"] < 0.5
    # the check is not vacuous: a catalog with shifted positions fails it
    cat_path = Path(run.workflow.run["repo"]) / run.workflow.run["output_run"] / "final_catalog.fits"
    cat = Table.read(cat_path)
    cat["x"] = np.asarray(cat["x"]) + 3.0
    cat.write(cat_path, overwrite=True)
    assert not check_catalog(tmp_path / "d", run)["ok"]


def test_demo_directory_is_not_overwritten(tmp_path: Path, cli) -> None:
    make_demo(tmp_path / "d", visits=1, detectors=1, n_sources=3)
    r = cli("demo", tmp_path / "d")
    assert r.exit_code == 2 and "already exists" in r.output
