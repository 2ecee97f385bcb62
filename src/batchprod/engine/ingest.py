"""Post-run ingest: published outputs become registry datasets, so later runs can query them.

The run's state store is the source of truth for what was published; this copies it into the data
registry (run = the output run, locations relative to the repository). Rows already registered are
updated in place, so an ingest interrupted by a crash is simply done again by the next execute or restart,
and a dataset made again (the final job re-runs after a restart) is registered as it is now.
"""

from __future__ import annotations

import os
from collections import defaultdict

from batchprod.execution.rundir import REGISTRY_FILE
from batchprod.graph.registry import Registry
from batchprod.state.run import Run


def ingest_outputs(run: Run) -> int:
    """Register every published output of the run; returns how many rows were offered."""
    repo, out_run = run.workflow.run["repo"], run.workflow.run["output_run"]
    dims = {dt: t.dimensions for t in run.qgraph.tasks for dt in t.outputs}
    rows: dict[str, list[tuple[str, str, int | None, str | None]]] = defaultdict(list)
    prefix = os.path.join(repo, "")
    for dt, data_id, path, size, checksum in run.store.output_columns("dataset_type", "data_id", "path", "size",
                                                                      "checksum"):
        # data IDs are stored canonical; outputs live under the repo (relpath costs ~9 µs a row)
        loc = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, repo)
        rows[dt].append((data_id, loc, size, checksum))
    if not rows:
        return 0
    registry = Registry(os.path.join(repo, REGISTRY_FILE))
    try:
        for dt in sorted(rows):
            registry.register_dataset_type(dt, dims.get(dt, ()))  # final-job outputs have no dimensions
            # what this run published is the truth for its data IDs (a re-run final job's product included)
            registry.insert_datasets(dt, out_run, rows[dt], update_existing=True)
    finally:
        registry.close()
    return sum(len(r) for r in rows.values())
