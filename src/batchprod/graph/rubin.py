"""Real Rubin quantum graphs (``.qg``, lsst pipe_base) converted once into our compact graph.

Read through pipe_base's own API, thin graph only (labels, data IDs, UUIDs, edges; no task imports:
``TaskImportMode.DO_NOT_IMPORT``), so reading costs the lsst imports (~1.5 s) plus the graph. Kept:
every quantum with its task label, its required data ID (string values such as ``instrument='Cam'``
through a vocabulary per dimension), its UUID (``external_ids``: ``QuantumGraph.quantum_of(uuid)``)
and its dependencies; the header's collections in ``metadata``. The datasets stay the Butler's: the
converted graph declares no registry inputs and no files of ours (the Butler job protocol will read
and write through the Butler).

lsst code is imported here only, lazily, and only when a Rubin graph is read: the core package and
the dispatcher never import it (extra ``batchprod[rubin]``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from batchprod.errors import GraphError
from batchprod.graph.quantum_graph import QuantumGraph, TaskNode


def read_rubin_qgraph(path: str | Path) -> QuantumGraph:
    """A Rubin ``.qg`` file as our QuantumGraph; one GraphError line naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: quantum graph file not found")
    try:
        from lsst.pipe.base.pipeline_graph import TaskImportMode
        from lsst.pipe.base.quantum_graph import PredictedQuantumGraph
    except ImportError:
        raise GraphError(f"{path}: reading a Rubin quantum graph needs the extra: pip install 'batchprod[rubin]'") \
            from None
    try:
        with PredictedQuantumGraph.open(str(path), import_mode=TaskImportMode.DO_NOT_IMPORT) as reader:
            reader.read_thin_graph()
            rg = reader.finish()
        xg = rg.quantum_only_xgraph
        pipeline = rg.pipeline_graph
        header = rg.header
    except Exception as exc:  # noqa: BLE001 (whatever pipe_base raises for a bad file: one line)
        raise GraphError(f"{path}: cannot read the Rubin quantum graph: {type(exc).__name__}: {exc}") from None
    return _convert(path, xg, pipeline, header)


def _convert(path: Path, xg: Any, pipeline: Any, header: Any) -> QuantumGraph:
    by_label: dict[str, list[Any]] = defaultdict(list)
    for q, attrs in xg.nodes(data=True):
        by_label[attrs["task_label"]].append(q)
    labels = _task_order(xg, by_label)
    tasks, rows_by_task = [], []
    for label in labels:
        node = pipeline.tasks[label]
        dims = tuple(node.dimensions.required)
        inputs = tuple(sorted({e.parent_dataset_type_name for e in node.inputs.values()}))
        outputs = tuple(sorted({e.parent_dataset_type_name for e in node.outputs.values()}))
        tasks.append(TaskNode(label, dims, inputs, outputs))
        rows = [(q, [xg.nodes[q]["data_id"].required[d] for d in dims]) for q in by_label[label]]
        rows.sort(key=lambda r: tuple(r[1]))  # deterministic: by data ID (each column has one type)
        rows_by_task.append(rows)
    # string dimensions: a vocabulary over every task's values of that dimension
    words: dict[str, set[str]] = defaultdict(set)
    for t, rows in zip(tasks, rows_by_task, strict=True):
        for i, d in enumerate(t.dimensions):
            values = {r[1][i] for r in rows}
            if any(isinstance(v, str) for v in values):
                if not all(isinstance(v, str) for v in values):
                    raise GraphError(f"{path}: dimension {d!r} mixes strings and numbers")
                words[d] |= values
            elif not all(isinstance(v, int) for v in values):
                raise GraphError(f"{path}: dimension {d!r} has values that are neither strings nor integers")
    vocab = {d: sorted(v) for d, v in words.items()}
    codes = {d: {w: i for i, w in enumerate(v)} for d, v in vocab.items()}
    order: list[Any] = []
    data_ids = []
    offsets = [0]
    for t, rows in zip(tasks, rows_by_task, strict=True):
        block = np.array([[codes[d][v] if d in codes else v for d, v in zip(t.dimensions, r[1], strict=True)]
                          for r in rows], dtype=np.int64).reshape(len(rows), len(t.dimensions))
        data_ids.append(block)
        order.extend(r[0] for r in rows)
        offsets.append(offsets[-1] + len(rows))
    index = {u: i for i, u in enumerate(order)}
    preds = [sorted(index[p] for p in xg.predecessors(u)) for u in order]
    pred_ptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in preds], out=pred_ptr[1:])
    pred_idx = np.fromiter((p for ps in preds for p in ps), dtype=np.int32, count=int(pred_ptr[-1]))
    ext_ids = np.frombuffer(b"".join(u.bytes for u in order), dtype=np.uint8).reshape(len(order), 16)
    metadata = {"source": "rubin", "qgraph_file": str(path.resolve()), "output_run": header.output_run,
                "output": header.output, "inputs": list(header.inputs or [])}
    qg = QuantumGraph(tasks, np.array(offsets), data_ids, pred_ptr, pred_idx, np.zeros(len(order) + 1, dtype=np.int64),
                      np.zeros(0, dtype=np.int64), [], metadata, vocab, ext_ids)
    qg.topological_order()  # a cycle would be a damaged file: say so here
    return qg


def _task_order(xg: Any, by_label: dict[str, list[Any]]) -> list[str]:
    """Task labels in dependency order (from the quanta's edges), ties by label."""
    after: dict[str, set[str]] = {lab: set() for lab in by_label}
    for u, v in xg.edges():
        a, b = xg.nodes[u]["task_label"], xg.nodes[v]["task_label"]
        if a != b:
            after[b].add(a)
    out: list[str] = []
    done: set[str] = set()
    while len(out) < len(after):
        ready = sorted(lab for lab, deps in after.items() if lab not in done and deps <= done)
        if not ready:
            raise GraphError("Rubin quantum graph: the tasks' dependencies form a cycle")
        out.extend(ready)
        done.update(ready)
    return out
