#!/usr/bin/env python
"""The dispatcher alone: N queued jobs over S fake sites, in virtual time.

    python bench/dispatcher_fake.py --jobs 1000000 --sites 10 [--runs 100] [--slots 2000] [--duration 60]

Builds R synthetic workflows of N/R quanta (one job per quantum), each a run with its real state store
(its own SQLite file; R runs of equal priority and share, as R campaigns would be), then drives them with the real RunDag + Dispatcher on S FakeBackend sites of
``--slots`` cores each, every attempt lasting ``--duration`` virtual seconds (a VirtualClock: no
sleeping). Prints assignments per second of wall time for the whole loop (placement, Launch
objects, state commits once per tick, polls, ends, retries bookkeeping) and for placement alone,
peak RSS, and checks that no site ever held more than its capacity. Goal (issue 9): >= 20,000
assignments/s and < 2 GB for 10^6 jobs over 10 sites.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    from batchprod.engine.dag import RunDag
    from batchprod.engine.dispatcher import Dispatcher, Site, VirtualClock
    from batchprod.execution.rundir import QGRAPH_FILE, WORKFLOW_FILE
    from batchprod.graph.synthetic import synthetic_graph
    from batchprod.state.run import Run
    from batchprod.state.store import STATE_FILE, StateStore
    from batchprod.wms.base import Capacity
    from batchprod.wms.fake import FakeBackend
    from batchprod.workflow import Resources, cluster_quanta

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--slots", type=int, default=2000, help="cores per site (1 core per job)")
    ap.add_argument("--duration", type=float, default=60.0, help="virtual seconds per attempt")
    ap.add_argument("--runs", type=int, default=1, help="runs sharing the sites (the jobs split among them)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        dirs = []
        total = 0
        for r in range(a.runs):
            sd = Path(d) / f"run{r}"
            sd.mkdir()
            qg = synthetic_graph(a.jobs // a.runs)
            wf = cluster_quanta(qg, [], lambda label, cluster: Resources(), run={"repo": d, "output_run": f"o{r}"})
            qg.save(sd / QGRAPH_FILE)
            wf.save(sd / WORKFLOW_FILE)
            (sd / "config.yaml").write_text("computeSite: local\n")
            (sd / "logs").mkdir()
            names = wf.job_names()
            store = StateStore(sd / STATE_FILE, create=True)
            store.init_run(f"bench{r}", str(sd), "fake", ({"id": j, "name": names[j], "label": wf.group(j).name,
                                                           "n_quanta": 1, "priority": 0, "request_memory": 2048}
                                                          for j in range(len(wf))))
            store.close()
            dirs.append(sd)
            total += len(wf)
        print(f"setup: {a.runs} runs, {total:,} jobs in {time.perf_counter() - t:.1f}s")

        clock = VirtualClock()
        sites = [Site.of(f"site{i}", FakeBackend(clock, duration=a.duration, name=f"site{i}",
                                                 capacity=Capacity(cores=a.slots, memory_mb=a.slots * 4096)))
                 for i in range(a.sites)]
        runs = [Run(sd) for sd in dirs]
        disp = Dispatcher(sites, clock)
        for run in runs:
            dag = RunDag(run, host="bench", wall=clock.time, mono=clock.monotonic)
            dag.load()
            dag.prepare_queue()
            disp.add(dag)
        placing = 0.0
        assign = disp.assign

        def timed_assign():  # type: ignore[no-untyped-def]
            nonlocal placing
            t0 = time.perf_counter()
            out = assign()
            placing += time.perf_counter() - t0
            return out

        disp.assign = timed_assign  # type: ignore[method-assign]
        t = time.perf_counter()
        results = disp.run()
        wall = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        over = [s.name for s in sites if s.peak["cores"] > s.cores or s.peak["jobs"] > s.max_jobs]
        used = sum(1 for s in sites if s.backend.started)
        states = sorted(set(map(str, results.values())))
        print(f"result: {len(results)} runs {states}; {disp.assigned:,} assignments on {used} of {a.sites} sites "
              f"(virtual time {clock.now - 1_000_000.0:,.0f}s)")
        print(f"dispatcher loop: {wall:.1f}s = {disp.assigned / wall:,.0f} assignments/s "
              f"(placement alone {placing:.1f}s = {disp.assigned / placing:,.0f}/s); peak RSS {rss:,.0f} MB")
        print(f"capacity: peak cores per site {max(s.peak['cores'] for s in sites)} of {a.slots}; "
              f"over capacity: {over or 'none'}")
        done = [s for run in runs for (s,) in run.store.job_columns("status")]
        print(f"state stores: {sum(1 for s in done if s == 'SUCCEEDED'):,} of {len(done):,} jobs SUCCEEDED")


if __name__ == "__main__":
    main()
