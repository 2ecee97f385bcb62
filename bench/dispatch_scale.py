#!/usr/bin/env python
"""Workload management at scale: C campaigns over S simulated sites, N jobs in all, through the real
campaign runner (control rounds, fair share by campaign, priorities, site health, state stores) in
virtual time -- what 'batchprod campaign simulate' does.

    python bench/dispatch_scale.py --campaigns 100 --sites 10 --jobs 1000000 [--slots 2000] [--duration 600]

Each campaign has one step of N/C synthetic jobs (the DRP shape of graph/synthetic.py), a priority
from 0 to 9 (campaign i: i % 10) and share 1; every site has ``--slots`` cores. Prints: assignments
per second of placement alone (the dispatcher's assign(): eligibility, priority, fair share, site
choice) and of the whole simulation, wall time of setup (synthetic runs and their state stores) and
of the whole simulation, peak RSS, and checks no site went over capacity and every job succeeded.
Goals (issue 10): placement >= 20,000 assignments/s, < 2 GB, the whole simulation < 60 s.
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    from batchprod.campaign.runner import CampaignRunner
    from batchprod.campaign.simulate import simulate
    from batchprod.campaign.sites import catalog_from_data
    from batchprod.campaign.spec import CampaignSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--campaigns", type=int, default=100)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--slots", type=int, default=2000, help="cores per site (1 core per job)")
    ap.add_argument("--duration", type=float, default=600.0, help="virtual seconds per attempt")
    a = ap.parse_args()
    from pathlib import Path

    per = a.jobs // a.campaigns
    specs = [CampaignSpec.model_validate({
        "campaign": f"c{i:03d}", "priority": i % 10, "owner": "bench",
        "steps": [{"name": "s", "submit": [f"synthetic-{i}.yaml"]}],
        "simulation": {"defaultDuration": a.duration, "jitter": 0.2, "jobs": {"s": per}, "sample": 600},
    }) for i in range(a.campaigns)]
    catalog = catalog_from_data({"sites": {f"site{k}": {"cores": a.slots, "memory": f"{a.slots * 4}GB"}
                                           for k in range(a.sites)}}, Path("bench-sites.yaml"))
    placing = [0.0]
    holder: list[CampaignRunner] = []

    def instrument(runner: CampaignRunner) -> None:
        d = runner.engine.dispatcher
        assign = d.assign

        def timed():  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = assign()
            placing[0] += time.perf_counter() - t0
            return out

        d.assign = timed  # type: ignore[method-assign]
        holder.append(runner)

    t = time.perf_counter()
    result = simulate(specs[0], catalog, extra=specs[1:], instrument=instrument)
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    d = holder[0].engine.dispatcher
    states = sorted({c["state"] for c in result.campaigns})
    over = [s.name for s in d.sites if s.peak["cores"] > s.cores]
    print(f"{a.campaigns} campaigns, {a.sites} sites x {a.slots} cores, {result.jobs:,} jobs: campaigns {states}; "
          f"makespan {result.makespan / 3600:.1f} h virtual")
    print(f"placement: {d.assigned:,} assignments in {placing[0]:.1f}s = {d.assigned / placing[0]:,.0f}/s")
    print(f"simulation: {total:.1f}s wall in all (runner loop {result.wall_seconds:.1f}s) = "
          f"{d.assigned / total:,.0f} assignments/s; peak RSS {rss:,.0f} MB")
    print(f"capacity: peak cores per site {max(s.peak['cores'] for s in d.sites)} of {a.slots}; "
          f"over capacity: {over or 'none'}")
    by_prio: dict[int, list[float]] = {}
    for c in result.campaigns:
        by_prio.setdefault(c["priority"], []).append(c["finished_s"] or 0.0)
    print("finished (virtual h) by priority: " + ", ".join(
        f"{p}: {min(v) / 3600:.1f}-{max(v) / 3600:.1f}" for p, v in sorted(by_prio.items(), reverse=True)))


if __name__ == "__main__":
    main()
