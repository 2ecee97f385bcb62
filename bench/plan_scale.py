#!/usr/bin/env python
"""Plan a synthetic graph of N quanta into a workflow and write its submit files; print the figures.

    python bench/plan_scale.py 10000 100000 1000000

Stages timed: build the graph (numpy, synthetic shape: isr, calibrate, coadd fan-in, measure),
topological check, cluster into jobs (one per quantum, and isr+calibrate per visit), job names,
write graph + workflow files, create the state store with every job row. Peak memory is the process
high-water mark (ru_maxrss) after each stage; each N runs in a fresh process.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int) -> dict:
    import gc

    from batchprod.graph.synthetic import synthetic_graph
    from batchprod.state.store import StateStore
    from batchprod.workflow import ClusterSpec, Resources, cluster_quanta

    out: dict = {"N": n}
    stages = []

    def stage(name: str, t0: float) -> None:
        stages.append((name, round(time.perf_counter() - t0, 3), round(peak_mb())))

    t_all = time.perf_counter()
    t0 = time.perf_counter()
    qg = synthetic_graph(n)
    gc.freeze()
    stage("build graph", t0)
    t0 = time.perf_counter()
    qg.topological_order()
    stage("topological check", t0)
    res = Resources()
    t0 = time.perf_counter()
    wf = cluster_quanta(qg, [], lambda label, cluster: res, run={"repo": "/r", "output_run": "o"})
    stage("workflow (1 quantum/job)", t0)
    t0 = time.perf_counter()
    wf_c = cluster_quanta(qg, [ClusterSpec("perVisit", ("isr", "calibrate"), ("visit",))], lambda label, cluster: res)
    stage("workflow (clustered)", t0)
    t0 = time.perf_counter()
    names = wf.job_names()
    stage("job names", t0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        qg.save(Path(d) / "g.bpqg")
        wf.save(Path(d) / "w.bpwf")
        stage("write graph+workflow", t0)
        t0 = time.perf_counter()
        store = StateStore(Path(d) / "state.db", create=True)
        store.init_run("bench", d, "local", ({"id": j, "name": names[j], "label": "x", "n_quanta": 1,
                                             "priority": 0, "request_memory": 2048} for j in range(len(wf))))
        store.close()
        stage("state store init", t0)
        sizes = {p.name: (Path(d) / p.name).stat().st_size for p in Path(d).iterdir()}
    out.update(quanta=len(qg), edges=qg.n_edges, jobs=len(wf), clustered_jobs=len(wf_c),
               total_s=round(time.perf_counter() - t_all, 2), peak_mb=round(peak_mb()), stages=stages,
               file_mb={k: round(v / 2**20, 1) for k, v in sizes.items()})
    return out


def main() -> None:
    args = sys.argv[1:] or ["10000", "100000", "1000000"]
    if args[0] == "--one":
        print(json.dumps(one(int(args[1]))))
        return
    for a in args:
        r = json.loads(subprocess.check_output([sys.executable, __file__, "--one", a]))
        print(f"N={r['N']:>9,}: quanta {r['quanta']:,}, edges {r['edges']:,}, jobs {r['jobs']:,} "
              f"(clustered {r['clustered_jobs']:,}); total {r['total_s']:.2f}s, peak {r['peak_mb']} MB")
        for name, s, mb in r["stages"]:
            print(f"    {name:<26} {s:8.3f}s  peak {mb:6d} MB")
        print(f"    files: {r['file_mb']}")


if __name__ == "__main__":
    main()
