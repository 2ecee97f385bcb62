"""Build a quantum graph from a pipeline, a data registry and a data query.

For each task (in topological order) every input dataset type is related to the task's dimensions:

* same dimensions            -> one input per quantum;
* task dimensions a subset   -> fan-in by projection (a per-visit task gathers all detectors);
* task dimensions a superset -> broadcast (a per-detector calibration used by every visit);
* otherwise                  -> a dimension relation stored in the registry (which (visit, detector)
                                overlap which (tract, patch)): fan-in over the related data IDs.

A task's quanta are the data IDs every non-broadcast input reaches, that the query does not reject
and whose broadcast inputs exist. Quanta are sorted by data ID so the graph is deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchprod._time import plural
from batchprod.errors import GraphError, PipelineError
from batchprod.graph.quantum_graph import QuantumGraph, TaskNode
from batchprod.graph.query import DataQuery
from batchprod.graph.registry import DatasetRecord, Registry, canonical
from batchprod.pipeline import Pipeline

Key = tuple[int, ...]
# a reference to an input: ("q", quantum index) for a produced dataset, ("x", ext index) for a registry one
Ref = tuple[str, int]


def _as_int(dim: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise GraphError(f"dimension '{dim}' has non-integer value {v!r}; only integer dimensions are supported")
    return v


def _project(key: Key, src_dims: Sequence[str], dst_dims: Sequence[str]) -> Key:
    pos = [src_dims.index(d) for d in dst_dims]
    return tuple(key[p] for p in pos)


def build_quantum_graph(
    pipeline: Pipeline,
    registry: Registry,
    query: str | None = None,
    input_runs: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> QuantumGraph:
    """Build the graph; raises PipelineError/GraphError with the task and dataset type at fault."""
    registry_types = registry.dataset_types()
    for t in pipeline.tasks:
        for dt in t.outputs:
            if dt in registry_types and set(registry_types[dt]) != set(t.dimensions):
                raise GraphError(
                    f"task '{t.label}': output '{dt}' is registered with dimensions ({', '.join(registry_types[dt])}), "
                    f"the task's are ({', '.join(t.dimensions)})")
    known_dims = registry.dimensions() | {d for t in pipeline.tasks for d in t.dimensions}
    dq = DataQuery(query, known_dims)
    relation_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[Key, list[Key]]] = {}
    relation_dims = registry.relation_dims()

    ext_datasets: list[tuple[str, str, str, str | None]] = []
    ext_cache: dict[str, list[tuple[Key, Ref]]] = {}

    def registry_candidates(dt: str) -> tuple[tuple[str, ...], list[tuple[Key, Ref]]]:
        dims = registry_types[dt]
        if dt not in ext_cache:
            out: list[tuple[Key, Ref]] = []
            # input runs are a chain: a dataset in an earlier run hides the same one in a later run;
            # without a chain, one data ID in two runs is ambiguous
            rank = {r: i for i, r in enumerate(input_runs or [])}
            chosen: dict[Key, DatasetRecord] = {}
            for rec in registry.find_datasets(dt, input_runs):
                if not dq.accepts(rec.data_id):
                    continue
                if set(rec.data_id) != set(dims):
                    raise GraphError(f"registry dataset {dt} {rec.data_id} does not match dimensions {dims}")
                key = tuple(_as_int(d, rec.data_id[d]) for d in dims)
                prev = chosen.get(key)
                if prev is not None and not rank:
                    raise GraphError(
                        f"input '{dt}' {canonical(rec.data_id)} is in runs '{prev.run}' and '{rec.run}'; "
                        "choose with payload.inCollection (runs searched in order)")
                if prev is None or rank[rec.run] < rank[prev.run]:
                    chosen[key] = rec
            for key, rec in chosen.items():
                ext_datasets.append((dt, canonical(rec.data_id), rec.location, rec.checksum))
                out.append((key, ("x", len(ext_datasets) - 1)))
            ext_cache[dt] = out
        return dims, ext_cache[dt]

    def related(src_dims: tuple[str, ...], dst_dims: tuple[str, ...], label: str, dt: str) -> dict[Key, list[Key]]:
        """Map data IDs over src_dims to the related data IDs projected onto dst_dims."""
        ck = (src_dims, dst_dims)
        if ck in relation_cache:
            return relation_cache[ck]
        for a, b in relation_dims:
            for left, right in ((a, b), (b, a)):
                if set(left) == set(src_dims) and set(dst_dims) <= set(right):
                    m: dict[Key, set[Key]] = defaultdict(set)
                    for da, db in registry.relations(left, right):
                        ka = tuple(_as_int(d, da[d]) for d in src_dims)
                        m[ka].add(tuple(_as_int(d, db[d]) for d in dst_dims))
                    relation_cache[ck] = {k: sorted(v) for k, v in m.items()}
                    return relation_cache[ck]
        raise GraphError(
            f"task '{label}': input '{dt}' has dimensions ({', '.join(src_dims)}) that do not relate to the "
            f"task's ({', '.join(dst_dims)}); register a dimension relation between them"
        )

    tasks: list[TaskNode] = []
    offsets = [0]
    data_id_blocks: list[np.ndarray] = []
    preds: list[list[int]] = []
    exts: list[list[int]] = []
    produced: dict[str, tuple[tuple[str, ...], list[tuple[Key, Ref]]]] = {}

    for t in pipeline.tasks:
        td = t.dimensions
        if not t.inputs:
            raise PipelineError(f"task '{t.label}': has no inputs; every task must read at least one dataset type")
        driving: list[dict[Key, list[Ref]]] = []
        broadcast: list[tuple[tuple[str, ...], dict[Key, Ref]]] = []
        for dt in t.inputs:
            if dt in produced:
                dd, cands = produced[dt]
            elif dt in registry_types:
                dd, cands = registry_candidates(dt)
            else:
                raise PipelineError(
                    f"task '{t.label}': input dataset type '{dt}' is produced by no task and not in the registry"
                )
            if set(dd) == set(td) or set(td) < set(dd):
                m: dict[Key, list[Ref]] = defaultdict(list)
                for key, ref in cands:
                    m[_project(key, dd, td)].append(ref)
                driving.append(m)
            elif set(td) > set(dd):
                broadcast.append((dd, {key: ref for key, ref in cands}))
            else:
                rel = related(dd, td, t.label, dt)
                m = defaultdict(list)
                for key, ref in cands:
                    for tk in rel.get(key, ()):
                        m[tk].append(ref)
                driving.append(m)
        if not driving:
            raise PipelineError(
                f"task '{t.label}': every input has fewer dimensions than the task; cannot tell which quanta to make"
            )
        keys = set(driving[0])
        for m in driving[1:]:
            keys &= set(m)
        base = offsets[-1]
        rows: list[Key] = []
        for key in sorted(keys):
            if not dq.accepts(dict(zip(td, key, strict=True))):
                continue
            refs: list[Ref] = [r for m in driving for r in m[key]]
            missing = False
            for dd, bmap in broadcast:
                r = bmap.get(_project(key, td, dd))
                if r is None:
                    missing = True
                    break
                refs.append(r)
            if missing:
                continue
            rows.append(key)
            preds.append(sorted({i for kind, i in refs if kind == "q"}))
            exts.append(sorted({i for kind, i in refs if kind == "x"}))
        tasks.append(TaskNode(t.label, td, t.inputs, t.outputs, t.python, t.command, t.config))
        data_id_blocks.append(np.array(rows, dtype=np.int64).reshape(-1, len(td)))
        offsets.append(base + len(rows))
        for out in t.outputs:
            produced[out] = (td, [(key, ("q", base + i)) for i, key in enumerate(rows)])

    n = offsets[-1]
    if n == 0:
        raise GraphError(f"no quanta: the query {query!r} selects no input data" if query else "no quanta: no input data")
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(p) for p in preds], out=pred_ptr[1:])
    ext_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(e) for e in exts], out=ext_ptr[1:])
    pred_idx = np.fromiter((i for p in preds for i in p), dtype=np.int32, count=int(pred_ptr[-1]))
    ext_idx = np.fromiter((i for e in exts for i in e), dtype=np.int64, count=int(ext_ptr[-1]))
    meta = {"query": query or "", **(metadata or {})}
    return QuantumGraph(tasks, np.array(offsets), data_id_blocks, pred_ptr, pred_idx, ext_ptr, ext_idx, ext_datasets, meta)


def describe(qg: QuantumGraph) -> str:
    """One-line summary: quanta per task and edges."""
    per = ", ".join(f"{k}={v:,}" for k, v in qg.counts().items())
    return f"{plural(len(qg), 'quantum', 'quanta')} ({per}), {plural(qg.n_edges, 'edge')}"

