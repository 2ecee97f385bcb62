#!/usr/bin/env python
"""The real prepare path at scale: registry query + graph build from a pipeline.

    python bench/build_scale.py 100000

Makes a registry of V x 189 ``raw`` datasets (rows only, no files) with (visit, detector) ->
(tract, patch) overlaps (each image overlaps 2 patches), then times ``build_quantum_graph`` for the
4-task pipeline isr -> calibrate -> coadd (fan-in) -> measure, and prints quanta, seconds, peak memory.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from batchprod.graph import Registry, build_quantum_graph
    from batchprod.pipeline import Pipeline, TaskDef

    n_raw = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    detectors = 189
    visits = max(1, n_raw // detectors)
    with tempfile.TemporaryDirectory() as d:
        reg = Registry(Path(d) / "registry.db", create=True)
        reg.register_dataset_type("raw", ["visit", "detector"])
        t0 = time.perf_counter()
        reg.insert_datasets("raw", "raw", (({"visit": v, "detector": k}, f"raw/{v}/{k}.fits", None, None)
                                           for v in range(visits) for k in range(detectors)))
        n_patch = max(1, visits * detectors * 2 // 40)
        reg.insert_relations(["visit", "detector"], ["tract", "patch"],
                             (({"visit": v, "detector": k}, {"tract": p // 100, "patch": p % 100})
                              for v in range(visits) for k in range(detectors)
                              for p in {((v * detectors + k) * 2 // 40 + o) % n_patch for o in (0, 1)}))
        t_reg = time.perf_counter() - t0
        pipe = Pipeline([
            TaskDef("isr", ("visit", "detector"), ("raw",), ("postIsr",), command="true"),
            TaskDef("calibrate", ("visit", "detector"), ("postIsr",), ("calexp",), command="true"),
            TaskDef("coadd", ("tract", "patch"), ("calexp",), ("deepCoadd",), command="true"),
            TaskDef("measure", ("tract", "patch"), ("deepCoadd",), ("objectTable",), command="true"),
        ])
        t0 = time.perf_counter()
        qg = build_quantum_graph(pipe, reg, "detector != 3")
        t_build = time.perf_counter() - t0
    print(f"raw {visits * detectors:,} (registry filled in {t_reg:.1f}s): {len(qg):,} quanta, {qg.n_edges:,} edges "
          f"built in {t_build:.2f}s; peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
