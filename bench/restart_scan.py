#!/usr/bin/env python
"""Time for ``restart`` to resume a run of N jobs of which half succeeded.

    python bench/restart_scan.py 100000 [--db URL]

Builds a synthetic N-quantum workflow, writes its submit directory and state store (the run's own
``state.db``, or the central database ``--db``: ``sqlite:///PATH`` or ``postgresql+psycopg://...``),
marks half of the jobs SUCCEEDED (a prefix in topological order, so the rest is resumable) and the
rest FAILED / UNREADY / RUNNING (a crashed orchestrator's leftovers) through the store's batched
``write`` (also timed: it is the engine's hot path, events included), then times the executor's
resume path: load the job states, recover interrupted attempts, reset the failed ones, compute the
ready set and commit it - everything up to launching the first job. Goal: < 2 s for N = 100,000 on
SQLite, < 5 s on PostgreSQL. Then times what an operator reads of that run (report, restart's plan,
--failures): goal < 1 s each. A run made in a central database is deleted from it at the end.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    from batchprod.engine.control import LocalExecutor
    from batchprod.execution.rundir import QGRAPH_FILE, WORKFLOW_FILE
    from batchprod.graph.synthetic import synthetic_graph
    from batchprod.state.database import public_url, select_db
    from batchprod.state.run import Run
    from batchprod.state.store import create_store
    from batchprod.workflow import Resources, cluster_quanta

    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=100_000)
    ap.add_argument("--db", default=None, help="central database URL (default: the run's own state.db)")
    a = ap.parse_args()
    select_db(a.db)
    n = a.n
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
        t = time.perf_counter()
        store = create_store(sd, "bench")
        store.init_run("bench", str(sd), "local", ({"id": j, "name": names[j], "label": wf.group(j).name,
                                                    "n_quanta": 1, "priority": 0, "request_memory": 2048}
                                                   for j in range(len(wf))))
        t_init = time.perf_counter() - t
        half = order[: len(order) // 2].tolist()
        rest = order[len(order) // 2 :].tolist()
        running = rest[:100]
        failed = rest[100:1100]
        now = time.time()

        def row(j: int, status: str, attempts: int) -> dict:
            return {"id": j, "status": status, "attempts": attempts, "retries": 0, "preemptions": 0,
                    "infra_failures": 0, "request_memory": 2048, "failure_class": None, "exit_code": None,
                    "message": None, "updated": now}

        t = time.perf_counter()
        store.write([row(j, "SUCCEEDED", 1) for j in half] + [row(j, "RUNNING", 1) for j in running]
                    + [row(j, "FAILED", 3) for j in failed],
                    [{"job_id": j, "number": 1, "status": "RUNNING", "pid": None, "start": now} for j in running])
        t_write = time.perf_counter() - t
        n_rows = len(half) + len(running) + len(failed)
        store.set_run(status="RUNNING")
        store.close()
        where = public_url(a.db) if a.db else "per-run SQLite file"
        print(f"store: {where}; init {t_init:.2f}s; one write() of {n_rows:,} job changes (+ events) "
              f"{t_write:.2f}s ({n_rows / t_write:,.0f} rows/s)")

        try:
            t0 = time.perf_counter()
            run = Run(sd)
            ex = LocalExecutor(run)
            dag = getattr(ex, "dag", None)
            if dag is not None:  # the engine split into a run DAG and a dispatcher
                dag.load()
                recovered = dag.recover([ex.backend])
            else:
                dag = ex
                ex._load_state()
                recovered = ex._recover()
            ready_before = time.perf_counter()
            dag.prepare_queue()  # what the run loop does before its first launch
            t1 = time.perf_counter()
            ex = dag
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
        finally:
            if a.db:
                Run(sd).store.delete_run()


if __name__ == "__main__":
    main()
