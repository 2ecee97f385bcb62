#!/usr/bin/env python
"""Time for ``restart`` to resume a run of N jobs of which half succeeded.

    python bench/restart_scan.py 100000

Builds a synthetic N-quantum workflow, writes its submit directory and state store, marks half of
the jobs SUCCEEDED (a prefix in topological order, so the rest is resumable) and the rest FAILED /
UNREADY / RUNNING (a crashed orchestrator's leftovers), then times the executor's resume path:
load the job states, recover interrupted attempts, reset the failed ones, compute the ready set and
commit it - everything up to launching the first job. Goal: < 5 s for N = 100,000. Then times what
an operator reads of that run (report, restart's plan, --failures): goal < 1 s each.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa


def main() -> None:
    from batchprod.engine.control import LocalExecutor
    from batchprod.execution.rundir import QGRAPH_FILE, WORKFLOW_FILE
    from batchprod.graph.synthetic import synthetic_graph
    from batchprod.state.run import Run
    from batchprod.state.store import StateStore, attempt_t, job_t
    from batchprod.workflow import Resources, cluster_quanta

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as d:
        sd = Path(d)
        qg = synthetic_graph(n)
        wf = cluster_quanta(qg, [], lambda label, cluster: Resources(), run={"repo": d, "output_run": "o"})
        qg.save(sd / QGRAPH_FILE)
        wf.save(sd / WORKFLOW_FILE)
        (sd / "config.yaml").write_text("computeSite: local\n")
        (sd / "logs").mkdir()
        names = wf.job_names()
        order = wf.topological_order()
        store = StateStore(sd / "state.db", create=True)
        store.init_run("bench", d, "local", ({"id": j, "name": names[j], "label": wf.group(j).name, "n_quanta": 1,
                                             "priority": 0, "request_memory": 2048} for j in range(len(wf))))
        half = order[: len(order) // 2].tolist()
        rest = order[len(order) // 2 :].tolist()
        with store.engine.begin() as conn:
            conn.execute(job_t.update().where(job_t.c.id.in_(sa.bindparam("ids", expanding=True)))
                         .values(status="SUCCEEDED", attempts=1), {"ids": half})
            running = rest[:100]
            failed = rest[100:1100]
            conn.execute(job_t.update().where(job_t.c.id.in_(sa.bindparam("ids", expanding=True)))
                         .values(status="RUNNING", attempts=1), {"ids": running})
            conn.execute(job_t.update().where(job_t.c.id.in_(sa.bindparam("ids", expanding=True)))
                         .values(status="FAILED", attempts=3), {"ids": failed})
            conn.execute(attempt_t.insert(), [{"job_id": j, "number": 1, "status": "RUNNING", "pid": None,
                                               "start": time.time()} for j in running])
        store.set_run(status="RUNNING")
        store.close()

        t0 = time.perf_counter()
        run = Run(sd)
        ex = LocalExecutor(run)
        ex._load_state()
        recovered = ex._recover()
        ready_before = time.perf_counter()
        ex.prepare_queue()  # what the run loop does before its first launch
        t1 = time.perf_counter()
        print(f"N={ex.n:,} jobs ({len(half):,} succeeded, {len(running)} interrupted, {len(failed)} failed): "
              f"restart ready to launch in {t1 - t0:.2f}s (load+recover {ready_before - t0:.2f}s, "
              f"ready set {t1 - ready_before:.2f}s); {len(ex.heap):,} jobs ready, {recovered} recovered; "
              f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        # what an operator reads of the same run, each from a fresh handle (nothing cached)
        from batchprod.report import summarize
        from batchprod.report.failures import failures
        from batchprod.report.report import restart_plan

        views = []
        for what, fn in (("report", summarize), ("restart plan", restart_plan),
                         ("failures (50 shown)", failures)):
            t = time.perf_counter()
            fn(Run(sd))
            views.append(f"{what} {time.perf_counter() - t:.2f}s")
        print("views: " + ", ".join(views))


if __name__ == "__main__":
    main()
