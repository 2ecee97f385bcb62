#!/usr/bin/env python
"""Provenance queries on a large finished run: one record, lineage up and down.

    python bench/provenance_query.py 100000

Builds a synthetic N-quantum run (isr -> calibrate -> coadd (fan-in of ~40 images) -> measure), marks
every job SUCCEEDED with one attempt in one context, and records every output (path, size, checksum)
in the state store, as a finished run has them. Then times what `batchprod provenance` does: open the
run, the record of one measure output, its whole upstream lineage, and the downstream lineage of one
isr output; and the post-run ingest of every output into the data registry. Nothing is written per dataset for provenance, so this is the cost of assembling it.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from batchprod.engine.ingest import ingest_outputs
    from batchprod.execution.capture import context_hash, context_record
    from batchprod.execution.rundir import QGRAPH_FILE, WORKFLOW_FILE
    from batchprod.graph.registry import Registry, canonical
    from batchprod.graph.synthetic import synthetic_graph
    from batchprod.provenance.lineage import Provenance
    from batchprod.state.run import Run
    from batchprod.state.store import StateStore
    from batchprod.workflow import Resources, cluster_quanta

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as d:
        sd = Path(d)
        t0 = time.perf_counter()
        qg = synthetic_graph(n)
        wf = cluster_quanta(qg, [], lambda label, cluster: Resources(), run={"repo": d, "output_run": "o"})
        qg.save(sd / QGRAPH_FILE)
        wf.save(sd / WORKFLOW_FILE)
        (sd / "config.yaml").write_text("computeSite: local\n")
        (sd / "pipeline.yaml").write_text("tasks: {}\n")
        names = wf.job_names()
        store = StateStore(sd / "state.db", create=True)
        store.init_run("bench", d, "local", ({"id": j, "name": names[j], "label": wf.group(j).name, "n_quanta": 1,
                                             "priority": 0, "request_memory": 2048} for j in range(len(wf))))
        rec = context_record()
        h = context_hash(rec)
        now = time.time()
        jobs, attempts, outputs = [], [], []
        for j in range(len(wf)):
            jobs.append({"id": j, "status": "SUCCEEDED", "attempts": 1, "retries": 0, "preemptions": 0,
                         "infra_failures": 0, "request_memory": 2048, "updated": now})
            attempts.append({"job_id": j, "number": 1, "status": "SUCCEEDED", "host": "node", "start": now,
                             "end": now + 1, "wall_s": 1.0, "cpu_s": 0.9, "peak_rss_mb": 100.0, "context": h})
            for q in wf.quanta(j):
                q = int(q)
                for r in qg.outputs(q, d, "o"):
                    outputs.append({"job_id": j, "node_id": qg.node_id(q), "dataset_type": r.dataset_type,
                                    "data_id": canonical(r.data_id), "path": r.path, "size": 1,
                                    "checksum": "sha256:" + "0" * 64})
        store.write(jobs, attempts, outputs, {h: rec})
        store.close()
        reg = Registry(sd / "registry.db", create=True)
        reg.close()
        t_setup = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_ingested = ingest_outputs(Run(sd))
        t_ingest = time.perf_counter() - t0

        t0 = time.perf_counter()
        prov = Provenance(Run(sd))
        t_open = time.perf_counter() - t0
        last = qg.outputs(len(qg) - 1, d, "o")[0].path
        first = qg.outputs(0, d, "o")[0].path
        t0 = time.perf_counter()
        record = prov.record(last)
        t_rec = time.perf_counter() - t0
        t0 = time.perf_counter()
        up = prov.lineage(last, "up")
        t_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        down = prov.lineage(first, "down")
        t_down = time.perf_counter() - t0
        size = len(json.dumps(record))
    print(f"N={len(qg):,} quanta, {len(outputs):,} outputs (setup {t_setup:.1f}s): open run {t_open:.2f}s; "
          f"record {t_rec * 1000:.0f} ms ({len(record['inputs'])} inputs, {size:,} B JSON); "
          f"lineage up {t_up:.2f}s ({len(up['quanta'])} quanta, {len(up['registry_inputs'])} registry inputs); "
          f"down {t_down:.2f}s ({len(down['quanta'])} quanta); ingest of every output into the registry "
          f"{t_ingest:.1f}s ({n_ingested:,}); "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
