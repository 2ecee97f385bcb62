"""Real Rubin quantum graphs (``.qg``, lsst pipe_base) converted once into our compact graph.

Opened through pipe_base's own API (header, pipeline graph; no task imports:
``TaskImportMode.DO_NOT_IMPORT``); of the quanta only the thin graph is read (labels, data IDs, UUIDs,
edges), so reading costs the lsst imports (~1.5 s, ~95 MB) plus the graph. The thin graph's JSON block
is scanned straight into arrays (:func:`_scan_thin`): pipe_base's model of it makes a pydantic object
per quantum and two UUID objects per edge, which at 6·10^4 quanta is ~95 MB more at the peak than the
arrays need. A block the scanner does not recognise (another format version) is read through
pipe_base's model instead: slower, same result. Kept: every quantum with its task label, its required
data ID (string values such as ``instrument='Cam'`` through a vocabulary per dimension), its UUID
(``external_ids``: ``QuantumGraph.quantum_of(uuid)``) and its dependencies; the header's collections in
``metadata``. The datasets stay the Butler's: the converted graph declares no registry inputs and no
files of ours (the Butler job protocol reads and writes through the Butler).

lsst code is imported here only, lazily, and only when a Rubin graph is read: the core package and
the dispatcher never import it (extra ``batchprod[rubin]``).
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchprod.errors import GraphError
from batchprod.graph.quantum_graph import QuantumGraph, TaskNode

_UUID = np.dtype((np.void, 16))


@dataclass
class _Thin:
    """The thin graph as arrays: per task label (file order) its quanta's UUIDs (n×16 bytes) and its
    required data ID values by column; edges as (producer, consumer) UUID pairs (m×2×16 bytes)."""

    ids: dict[str, np.ndarray]
    columns: dict[str, list[list[int | str]]]
    edges: np.ndarray


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
    # the model reader makes ~10^6 small objects that all live until the conversion ends: the cyclic
    # garbage collector, walking them again and again as they are made, would cost more than the reading
    gc_was = gc.isenabled()
    gc.disable()
    try:
        try:
            with PredictedQuantumGraph.open(str(path), import_mode=TaskImportMode.DO_NOT_IMPORT) as reader:
                pipeline = reader.components.pipeline_graph
                header = reader.components.header
                required = {label: len(node.dimensions.required) for label, node in pipeline.tasks.items()}
                thin = _scan_thin(reader, required)
                if thin is None:
                    reader.read_thin_graph()  # the thin graph only: no networkx graph, no DataCoordinates
                    thin = _from_model(reader.components.thin_graph, required)
        except GraphError:
            raise
        except Exception as exc:  # noqa: BLE001 (whatever pipe_base raises for a bad file: one line)
            raise GraphError(f"{path}: cannot read the Rubin quantum graph: {type(exc).__name__}: {exc}") from None
        return _convert(path, thin, pipeline, header)
    finally:
        if gc_was:
            gc.enable()


# The thin-graph block as pipe_base (format version 1) writes it, compact JSON:
#   {"quanta":{"LABEL":[{"quantum_id":"UUID","data_coordinate":[V,...]},...],...},"edges":[["UUID","UUID"],...]}
_STR = rb'"(?:[^"\\]|\\.)*"'
_VAL = rb"(?:" + _STR + rb"|-?\d+)"
_LABEL = re.compile(rb'"([A-Za-z0-9_.-]+)":\[')
_QUANTUM = re.compile(rb'\{"quantum_id":"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",'
                      rb'"data_coordinate":\[((?:' + _VAL + rb"(?:," + _VAL + rb")*)?)\]\}")
_VALUES = re.compile(_STR + rb"|-?\d+")


def _scan_thin(reader: Any, required: dict[str, int]) -> _Thin | None:
    """The thin graph's block scanned into arrays, or None if it is not the layout above (the caller
    then reads it through pipe_base's model). Python touches each quantum once; edges not at all."""
    if getattr(reader.header, "version", 0) != 1 or not hasattr(reader, "_read_single_block_raw"):
        return None
    raw: bytes = reader._read_single_block_raw("thin_graph")
    if not raw.startswith(b'{"quanta":{'):
        return None
    pos, ids, columns = len(b'{"quanta":{'), {}, {}
    words: dict[bytes, str] = {}  # one str object per distinct string value
    while raw[pos:pos + 1] != b"}":
        m = _LABEL.match(raw, pos)
        if m is None or (label := m.group(1).decode()) not in required or label in ids:
            return None
        pos, k = m.end(), required[label]
        hexes: list[bytes] = []
        cols: list[list[int | str]] = [[] for _ in range(k)]
        while raw[pos:pos + 1] != b"]":
            m = _QUANTUM.match(raw, pos)
            if m is None:
                return None
            hexes.append(m.group(1))
            values = _VALUES.findall(m.group(2))
            if len(values) < k:
                return None
            for col, v in zip(cols, values[:k], strict=True):
                if v[:1] == b'"':
                    s = words.get(v)
                    if s is None:
                        s = words[v] = json.loads(v)
                    col.append(s)
                else:
                    col.append(int(v))
            pos = m.end()
            if raw[pos:pos + 1] == b",":
                pos += 1
        ids[label] = _uuids(b"".join(hexes), len(hexes))
        columns[label] = cols
        pos += 1
        if raw[pos:pos + 1] == b",":
            pos += 1
    pos += 1
    if not raw.startswith(b',"edges":[', pos) or not raw.endswith(b"]}"):
        return None
    section = raw[pos + len(b',"edges":['):-2]
    m_edges = 0 if not section else section.count(b"],[") + 1
    try:
        edges = _uuids(section.translate(None, b'[]",'), 2 * m_edges).reshape(m_edges, 2, 16)
    except ValueError:
        return None
    return _Thin(ids, columns, edges)


def _uuids(text: bytes, n: int) -> np.ndarray:
    """``n`` UUIDs written as hex (dashes allowed) back to back, as n×16 bytes; ValueError if not."""
    data = bytes.fromhex(text.translate(None, b"-").decode("ascii"))
    if len(data) != 16 * n:
        raise ValueError("not as many UUIDs as expected")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, 16)


def _from_model(thin: Any, required: dict[str, int]) -> _Thin:
    """pipe_base's thin-graph model as arrays (any format version it reads)."""
    ids, columns = {}, {}
    for label, quanta in thin.quanta.items():
        if label not in required:
            raise ValueError(f"quanta of task {label!r}, which is not in the graph's pipeline")
        k = required[label]
        ids[label] = _uuids(b"".join(q.quantum_id.bytes.hex().encode() for q in quanta), len(quanta))
        columns[label] = [list(c) for c in zip(*(q.data_coordinate[:k] for q in quanta), strict=True)] if quanta \
            else [[] for _ in range(k)]
    edges = np.frombuffer(b"".join(a.bytes + b.bytes for a, b in thin.edges), dtype=np.uint8).reshape(-1, 2, 16)
    return _Thin(ids, columns, edges)


def _convert(path: Path, thin: _Thin, pipeline: Any, header: Any) -> QuantumGraph:
    """The thin graph's arrays into ours: quanta sorted per label by data ID, labels in dependency
    order, edges by UUID lookup (sorted keys, binary search), string dimensions through a vocabulary."""
    labels_in_file = [label for label, ids in thin.ids.items() if len(ids)]
    dims = {label: tuple(pipeline.tasks[label].dimensions.required) for label in labels_in_file}
    counts = [len(thin.ids[label]) for label in labels_in_file]
    n = sum(counts)
    file_ids = np.concatenate([thin.ids[label] for label in labels_in_file]) if n else np.zeros((0, 16), np.uint8)
    keys = np.ascontiguousarray(file_ids).view(_UUID).ravel()
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    if n > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        raise GraphError(f"{path}: damaged Rubin quantum graph: two quanta have one UUID")
    wanted = np.ascontiguousarray(thin.edges).view(_UUID).reshape(-1)
    at = np.minimum(np.searchsorted(sorted_keys, wanted), max(n - 1, 0))
    if len(wanted) and (n == 0 or (sorted_keys[at] != wanted).any()):
        raise GraphError(f"{path}: damaged Rubin quantum graph: an edge names a quantum that is not in it")
    edges = by_key[at].reshape(-1, 2).astype(np.int64)
    task_of_file = np.repeat(np.arange(len(labels_in_file)), counts)
    labels = _task_order(labels_in_file, task_of_file[edges[:, 0]], task_of_file[edges[:, 1]])
    # string dimensions: a vocabulary over every task's values of that dimension
    words: dict[str, set[str]] = {}
    numbers: set[str] = set()
    for label in labels:
        for d, col in zip(dims[label], thin.columns[label], strict=True):
            kinds = {type(v) for v in col}
            if kinds == {str}:
                words.setdefault(d, set()).update(col)
            elif kinds <= {int}:
                numbers.add(d)
            else:
                raise GraphError(f"{path}: dimension {d!r} mixes strings and numbers (or holds neither)")
    if numbers & words.keys():
        raise GraphError(f"{path}: dimension {sorted(numbers & words.keys())[0]!r} mixes strings and numbers")
    vocab = {d: sorted(v) for d, v in words.items()}
    codes = {d: {w: i for i, w in enumerate(v)} for d, v in vocab.items()}
    tasks, data_ids, offsets = [], [], [0]
    new_of_file = np.empty(n, dtype=np.int64)
    first_of_label = dict(zip(labels_in_file, np.cumsum([0, *counts]).tolist(), strict=False))
    for label in labels:
        node = pipeline.tasks[label]
        cols = [np.array([codes[d][v] for v in col] if d in codes else col, dtype=np.int64)
                for d, col in zip(dims[label], thin.columns[label], strict=True)]
        size = len(thin.ids[label])
        block = np.stack(cols, axis=1) if cols else np.zeros((size, 0), dtype=np.int64)
        # deterministic: by data ID (a vocabulary is sorted, so codes sort as their strings)
        order = np.lexsort(block.T[::-1]) if block.shape[1] else np.arange(size)
        data_ids.append(block[order])
        new_of_file[first_of_label[label] + order] = offsets[-1] + np.arange(size)
        offsets.append(offsets[-1] + size)
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
    ext_ids = np.empty((n, 16), dtype=np.uint8)
    ext_ids[new_of_file] = file_ids
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
