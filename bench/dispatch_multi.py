#!/usr/bin/env python
"""One dispatcher, several runs, several local sites: throughput and capacity, checked from the store.

    python bench/dispatch_multi.py --runs 2 --jobs 5000 --sites 2 --cores 1

Prepares R runs of N independent no-op jobs (``touch {outputs.out}``: stage-in check, staging,
publication, checksum and manifest all happen), then drives all of them with ONE Dispatcher over S
local-process sites of C cores each (real processes). Prints jobs/s, how the attempts spread over
the sites, and, from each run's state store (attempt rows: site, start, end), the most attempts
that ever ran at once on each site: it must never exceed the site's cores (issue 9 gate).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end before a start
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def main() -> None:
    from batchprod.engine.dag import RunDag
    from batchprod.engine.dispatcher import Dispatcher, Site
    from batchprod.engine.prepare import prepare
    from batchprod.testing import command_task, make_toy_repo, write_submit
    from batchprod.wms.local.backend import LocalBackend, LocalSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--cores", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        runs = []
        for r in range(a.runs):
            repo = make_toy_repo(Path(d) / f"repo{r}", visits=range(a.jobs), detectors=(0,))
            pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "touch {outputs.out}")}}
            runs.append(prepare(write_submit(Path(d) / f"run{r}", pipeline, repo=repo)))
        print(f"prepare: {a.runs} runs x {a.jobs:,} jobs in {time.perf_counter() - t:.1f}s")
        sites = [Site.of(f"local{i}", LocalBackend(LocalSettings(cores=a.cores, memory=1 << 20)))
                 for i in range(a.sites)]
        for s in sites:
            s.backend.name = s.name
        disp = Dispatcher(sites)
        for run in runs:
            dag = RunDag(run, host="bench")
            dag.load()
            dag.recover([s.backend for s in sites])
            dag.prepare_queue()
            disp.add(dag)
        t = time.perf_counter()
        results = disp.run()
        wall = time.perf_counter() - t
        for s in sites:
            s.backend.close()
        n = a.runs * a.jobs
        print(f"dispatch: {n:,} jobs in {wall:.1f}s = {n / wall:,.0f} jobs/s; results {sorted(map(str, results.values()))}")
        per_site: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in runs:
            for att in run.store.attempts():
                per_site[att.get("site") or "?"].append((att["start"], att["end"]))
        for name, iv in sorted(per_site.items()):
            print(f"site {name}: {len(iv):,} attempts; most at once (from the state store) {_most_at_once(iv)} "
                  f"of {a.cores} cores")
        print(f"dispatcher's own peaks: {[s.peak for s in sites]}")


if __name__ == "__main__":
    main()
