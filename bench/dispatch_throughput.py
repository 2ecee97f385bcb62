#!/usr/bin/env python
"""No-op jobs per second, end to end, state recording included.

    python bench/dispatch_throughput.py --backend local --jobs 10000
    python bench/dispatch_throughput.py --backend slurm --jobs 2000     # needs scripts/dev-slurm.sh up
    python bench/dispatch_throughput.py --backend parsl --jobs 10000

N independent jobs, each one quantum whose payload is ``touch {outputs.out}`` (the smallest job that
still goes through stage-in check, staging, publication, checksum and the result manifest). Timed
from the orchestrator's start to its end (prepare excluded, printed separately). Prints jobs/s, the
goal from issue 4 and the ratio to the process-start limit measured on this machine.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

GOALS = {"local": 300.0, "slurm": 20.0, "parsl": 200.0}


def process_start_rate(n: int = 300) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/true"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    from batchprod.engine.control import execute
    from batchprod.engine.prepare import prepare
    from batchprod.testing import command_task, make_toy_repo, write_submit
    from batchprod.wms.registry import get_wms

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=sorted(GOALS), default="local")
    ap.add_argument("--jobs", type=int, default=10_000)
    a = ap.parse_args()
    side = math.isqrt(a.jobs - 1) + 1
    visits, detectors = side, math.ceil(a.jobs / side)
    cores = os.cpu_count() or 1
    sites = {
        "local": {"computeSite": "local", "site": {"local": {"cores": cores}}},
        "slurm": {"computeSite": "slurm", "site": {"slurm": {"wmsServiceClass": "slurm", "pollInterval": 0.5,
                                                              "maxJobs": 2000, "maxIdle": 2000}}},
        "parsl": {"computeSite": "parsl", "site": {"parsl": {"wmsServiceClass": "parsl", "maxWorkers": cores}}},
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        t0 = time.perf_counter()
        repo = make_toy_repo(Path(d) / "repo", visits=range(visits), detectors=range(detectors))
        pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "touch {outputs.out}")}}
        cfg = write_submit(Path(d), pipeline, repo=repo, requestMemory=200, **sites[a.backend])
        run = prepare(cfg)
        t_prep = time.perf_counter() - t0
        n = run.store.run_info()["n_jobs"]
        t1 = time.perf_counter()
        state = execute(get_wms(run.wms_name()), run)
        secs = time.perf_counter() - t1
        ok = sum(1 for j in run.store.jobs() if j["status"] == "SUCCEEDED")
    rate = n / secs
    limit = process_start_rate() * cores
    print(f"backend {a.backend}: {n:,} jobs ({ok:,} succeeded, run {state}) in {secs:.1f}s = {rate:.0f} jobs/s "
          f"(prepare {t_prep:.1f}s); goal {GOALS[a.backend]:.0f}/s -> {rate / GOALS[a.backend]:.2f}x goal; "
          f"process-start limit here ~{limit:.0f}/s ({cores} cores) -> {rate / limit:.1%} of it")


if __name__ == "__main__":
    main()
