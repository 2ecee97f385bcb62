"""Two Parsl sites in one process: each backend has its own DataFlowKernel (no global parsl.load()),
both run attempts at the same time, and closing one leaves the other working."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from batchprod.testing import drain_ends, shell_launch
from batchprod.wms.base import Capacity, Ended, SiteUnavailable

if os.environ.get("BATCHPROD_REQUIRE_ENGINES") != "1":  # in CI a missing Parsl fails the import
    pytest.importorskip("parsl")

from batchprod.wms.parsl import ParslBackend, ParslSettings  # noqa: E402


def test_two_parsl_sites_in_one_process(tmp_path: Path) -> None:
    from parsl.dataflow.dflow import DataFlowKernelLoader

    sites = [ParslBackend(ParslSettings(maxWorkers=3).for_site(name), run_dir=tmp_path / name / "parsl")
             for name in ("east", "west")]
    try:
        assert sites[0].dfk is not sites[1].dfk and DataFlowKernelLoader._dfk is None  # no global kernel
        assert {s.label for s in sites} == {"batchprod-east", "batchprod-west"}
        assert sites[0].capacity() == Capacity(cores=12)  # ~4 tasks per worker in flight
        # each site runs three attempts of its own run; every attempt waits (up to a minute) until an
        # attempt of the other site has started: they all succeed only if both sites run at once
        runs = {s.settings.site: tmp_path / s.settings.site / "run" for s in sites}
        mark = {name: tmp_path / f"{name}.started" for name in runs}

        def command(me: str, other: str) -> str:
            return (f'echo "$BATCHPROD_SUBMIT_DIR"; touch {mark[me]}; i=0; '
                    f"while [ ! -e {mark[other]} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
                    f"test -e {mark[other]}")

        launches = {"east": [shell_launch(runs["east"], j, command("east", "west")) for j in range(3)],
                    "west": [shell_launch(runs["west"], j, command("west", "east")) for j in range(3)]}
        for s in sites:
            assert len(s.start(launches[s.settings.site])) == 3
        ends: dict[str, list[Ended]] = {}
        threads = [threading.Thread(target=lambda s=s: ends.__setitem__(s.settings.site, drain_ends(s, 3, timeout=120))) for s in sites]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for s in sites:
            name = s.settings.site
            got = ends[name]
            assert sorted(e.key for e in got) == sorted(la.key for la in launches[name])
            assert all(e.exit_code == 0 and e.fclass is None for e in got), got  # met the other site's attempts
            for la in launches[name]:
                assert str(runs[name]) in la.stdout.read_text().splitlines()  # the job knows its run

        sites[0].close()  # one site goes; the other still runs attempts
        late = shell_launch(runs["west"], 9, "true")
        sites[1].start([late])
        (ended,) = drain_ends(sites[1], 1, timeout=120)
        assert ended.key == late.key and ended.exit_code == 0

        # an executor that gave up (its block cannot start, the interchange died) is an unavailable
        # site, not an idle one
        sites[1].dfk.executors[sites[1].label].set_bad_state_and_fail_all(RuntimeError("block lost"))
        with pytest.raises(SiteUnavailable, match=r"site 'west' unavailable: Parsl executor failed: block lost"):
            sites[1].poll()
        with pytest.raises(SiteUnavailable):  # and nothing is started there
            sites[1].start([shell_launch(runs["west"], 10, "true")])
        assert sites[1].active() == 0
    finally:
        for s in sites:
            s.close()
    assert all(s.dfk.cleanup_called for s in sites)
    assert DataFlowKernelLoader._dfk is None  # nothing was loaded globally, nothing to clear
