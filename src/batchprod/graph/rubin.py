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

import gc
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
    # the reader makes ~10^6 small objects that all live until the conversion ends: the cyclic garbage
    # collector, walking them again and again as they are made, would cost more than the reading
    gc_was = gc.isenabled()
    gc.disable()
    try:
        try:
            with PredictedQuantumGraph.open(str(path), import_mode=TaskImportMode.DO_NOT_IMPORT) as reader:
                reader.read_thin_graph()  # the thin graph only: no networkx graph, no DataCoordinate per quantum
                thin = reader.components.thin_graph
                pipeline = reader.components.pipeline_graph
                header = reader.components.header
        except Exception as exc:  # noqa: BLE001 (whatever pipe_base raises for a bad file: one line)
            raise GraphError(f"{path}: cannot read the Rubin quantum graph: {type(exc).__name__}: {exc}") from None
        return _convert(path, thin, pipeline, header)
    finally:
        if gc_was:
            gc.enable()


def _convert(path: Path, thin: Any, pipeline: Any, header: Any) -> QuantumGraph:
    """The thin graph's quanta (per task label: UUID, data coordinate values, required ones first)
    and edges (UUID pairs) into our arrays. Python touches each quantum and edge once (UUIDs keyed
    by their integer: ``uuid.UUID.__hash__`` is Python code); sorting and remapping are numpy."""
    labels_in_file = [label for label, quanta in thin.quanta.items() if quanta]
    dims, vals, ids = {}, {}, []
    index: dict[int, int] = {}
    file_task = []
    for t, label in enumerate(labels_in_file):
        node = pipeline.tasks[label]
        dims[label] = tuple(node.dimensions.required)
        k = len(dims[label])
        quanta = thin.quanta[label]
        vals[label] = [q.data_coordinate[:k] for q in quanta]
        for q in quanta:
            u = q.quantum_id
            index[u.int] = len(ids)
            ids.append(u)
        file_task.append(np.full(len(quanta), t, dtype=np.int64))
    n = len(ids)
    try:
        edges = np.array([(index[a.int], index[b.int]) for a, b in thin.edges], dtype=np.int64).reshape(-1, 2)
    except KeyError:
        raise GraphError(f"{path}: damaged Rubin quantum graph: an edge names a quantum that is not in it") from None
    task_of_file = np.concatenate(file_task) if file_task else np.zeros(0, dtype=np.int64)
    labels = _task_order(labels_in_file, task_of_file[edges[:, 0]], task_of_file[edges[:, 1]])
    # string dimensions: a vocabulary over every task's values of that dimension
    words: dict[str, set[str]] = defaultdict(set)
    blocks: dict[str, np.ndarray] = {}
    for label in labels:
        try:
            blocks[label] = np.array(vals[label], dtype=np.int64).reshape(len(vals[label]), len(dims[label]))
        except (TypeError, ValueError):  # strings (instrument='Cam'): per column below
            blocks[label] = np.array(vals[label], dtype=object).reshape(len(vals[label]), len(dims[label]))
            for i, d in enumerate(dims[label]):
                col = set(blocks[label][:, i].tolist())
                if all(isinstance(v, str) for v in col):
                    words[d] |= col
                elif not all(isinstance(v, int) and not isinstance(v, bool) for v in col):
                    raise GraphError(f"{path}: dimension {d!r} mixes strings and numbers (or holds neither)") from None
    vocab = {d: sorted(v) for d, v in words.items()}
    codes = {d: {w: i for i, w in enumerate(v)} for d, v in vocab.items()}
    tasks, data_ids, offsets = [], [], [0]
    new_of_file = np.empty(n, dtype=np.int64)
    first_of_label = dict(zip(labels_in_file, np.cumsum([0] + [len(vals[lab]) for lab in labels_in_file]).tolist(),
                              strict=False))
    for label in labels:
        node = pipeline.tasks[label]
        block = blocks[label]
        if block.dtype == object:
            for i, d in enumerate(dims[label]):
                if d in codes:
                    block[:, i] = [codes[d][v] for v in block[:, i]]
                elif d in vocab:
                    raise GraphError(f"{path}: dimension {d!r} mixes strings and numbers")
            block = block.astype(np.int64)
        # deterministic: by data ID (a vocabulary is sorted, so codes sort as their strings)
        order = np.lexsort(block.T[::-1]) if block.shape[1] else np.arange(len(block))
        data_ids.append(block[order])
        new_of_file[first_of_label[label] + order] = offsets[-1] + np.arange(len(order))
        offsets.append(offsets[-1] + len(order))
        inputs = tuple(sorted({e.parent_dataset_type_name for e in node.inputs.values()}))
        # every dataset a quantum writes: its outputs, and its metadata and log (the Butler holds them too)
        outputs = tuple(sorted({e.parent_dataset_type_name for e in node.iter_all_outputs()}))
        tasks.append(TaskNode(label, dims[label], inputs, outputs))
    edges = new_of_file[edges]
    edges = np.unique(edges, axis=0) if len(edges) else edges
    by_consumer = np.lexsort((edges[:, 0], edges[:, 1]))  # per consumer, producers ascending
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(edges[:, 1], minlength=n), out=pred_ptr[1:])
    pred_idx = edges[by_consumer, 0].astype(np.int32)
    raw = np.frombuffer(b"".join(u.bytes for u in ids), dtype=np.uint8).reshape(n, 16)
    ext_ids = np.empty_like(raw)
    ext_ids[new_of_file] = raw
    metadata = {"source": "rubin", "qgraph_file": str(path.resolve()), "output_run": header.output_run,
                "output": header.output, "inputs": list(header.inputs or [])}
    qg = QuantumGraph(tasks, np.array(offsets), data_ids, pred_ptr, pred_idx, np.zeros(n + 1, dtype=np.int64),
                      np.zeros(0, dtype=np.int64), [], metadata, vocab, ext_ids)
    qg.topological_order()  # a cycle would be a damaged file: say so here
    return qg


def _task_order(labels: list[str], producer_task: np.ndarray, consumer_task: np.ndarray) -> list[str]:
    """Task labels in dependency order (from the quanta's edges), ties by label."""
    pairs = np.unique(np.stack([producer_task, consumer_task], axis=1), axis=0) if len(producer_task) else []
    after: dict[str, set[str]] = {lab: set() for lab in labels}
    for a, b in (pairs.tolist() if len(pairs) else []):
        if a != b:
            after[labels[b]].add(labels[a])
    out: list[str] = []
    done: set[str] = set()
    while len(out) < len(after):
        ready = sorted(lab for lab, deps in after.items() if lab not in done and deps <= done)
        if not ready:
            raise GraphError("Rubin quantum graph: the tasks' dependencies form a cycle")
        out.extend(ready)
        done.update(ready)
    return out
