"""General data IDs in the compact graph: string dimension values through a vocabulary (codes sort as
the strings do), opaque external node ids (16 bytes a quantum) found by binary search, and files that
keep both; native graphs unchanged."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from batchprod.errors import GraphError
from batchprod.graph.quantum_graph import QuantumGraph, TaskNode, vocabulary
from batchprod.graph.synthetic import synthetic_graph
from batchprod.workflow import Resources, cluster_quanta


def _graph(n_det: int = 3, ids: bool = True) -> tuple[QuantumGraph, list[uuid.UUID]]:
    """isr per (instrument, detector) for two instruments, a gather per instrument."""
    insts = ["LSSTCam", "Cam"] * n_det  # unsorted on purpose
    dets = [d for d in range(n_det) for _ in range(2)]
    words, codes = vocabulary(insts)
    gwords, gcodes = vocabulary(["LSSTCam", "Cam"])
    assert words == gwords == ["Cam", "LSSTCam"]  # sorted: codes sort as the strings do
    tasks = [TaskNode("isr", ("instrument", "detector"), ("raw",), ("postIsr",), command="true"),
             TaskNode("gather", ("instrument",), ("postIsr",), ("summary",), command="true")]
    n_isr = len(insts)
    n = n_isr + 2
    isr_ids = np.stack([codes, np.array(dets)], axis=1)
    # gather i <- every isr of instrument i
    preds = [np.flatnonzero(codes == gcodes[k]) for k in range(2)]
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    pred_ptr[n_isr + 1:] = np.cumsum([len(p) for p in preds])
    pred_idx = np.concatenate(preds).astype(np.int32)
    ext_ptr = np.zeros(n + 1, dtype=np.int64)
    uuids = [uuid.uuid4() for _ in range(n)]
    ext = np.frombuffer(b"".join(u.bytes for u in uuids), dtype=np.uint8).reshape(n, 16) if ids else None
    qg = QuantumGraph(tasks, np.array([0, n_isr, n]), [isr_ids, gcodes.reshape(-1, 1)], pred_ptr, pred_idx, ext_ptr,
                      np.zeros(0, dtype=np.int64), [], {"source": "test"}, {"instrument": words}, ext)
    return qg, uuids


def test_string_dimensions_round_trip_and_name_jobs(tmp_path: Path) -> None:
    qg, uuids = _graph()
    assert qg.data_id(0) == {"instrument": "LSSTCam", "detector": 0}
    assert qg.data_id(1) == {"instrument": "Cam", "detector": 0}
    assert qg.data_id(len(qg) - 1) == {"instrument": "Cam"}
    qg.save(tmp_path / "g")
    back = QuantumGraph.load(tmp_path / "g")
    assert [back.data_id(q) for q in range(len(back))] == [qg.data_id(q) for q in range(len(qg))]
    assert back.external_id(3) == uuids[3].hex and back.quantum_of(str(uuids[3])) == 3
    wf = cluster_quanta(back, [], lambda label, cluster: Resources(), run={"repo": str(tmp_path), "output_run": "o"})
    names = wf.job_names()
    assert "isr_instrumentLSSTCam_detector0" in names and "gather_instrumentCam" in names
    assert len(set(names)) == len(names)
    assert {tuple(p) for p in (wf.parents(j) for j in range(len(wf))) if len(p)} and len(wf) == len(qg)
    assert back.outputs(1, tmp_path, "o")[0].path.endswith("postIsr_instrumentCam_detector0.fits")


def test_external_ids_are_found_by_binary_search() -> None:
    n = 100_000
    qg = synthetic_graph(n)
    rng = np.random.default_rng(1)
    ext = rng.integers(0, 256, size=(len(qg), 16), dtype=np.uint8)
    g = QuantumGraph(qg.tasks, qg.task_offsets, qg.data_ids, qg.pred_ptr, qg.pred_idx, qg.ext_ptr, qg.ext_idx,
                     qg.ext_datasets, external_ids=ext)
    for q in rng.integers(0, len(g), size=200).tolist():
        assert g.quantum_of(ext[q].tobytes()) == q and g.quantum_of(g.external_id(q)) == q
    with pytest.raises(GraphError, match="no quantum with node id"):
        g.quantum_of(uuid.UUID(int=7).hex)
    with pytest.raises(GraphError, match="no external node ids"):
        qg.quantum_of(uuid.UUID(int=7).hex)


def test_damaged_vocabularies_and_ids_are_one_graph_error(tmp_path: Path) -> None:
    qg, _ = _graph()
    bad = QuantumGraph(qg.tasks, qg.task_offsets, qg.data_ids, qg.pred_ptr, qg.pred_idx, qg.ext_ptr, qg.ext_idx,
                       [], vocab={"instrument": ["Cam"]})  # code 1 has no word
    bad.save(tmp_path / "g")
    with pytest.raises(GraphError, match="damaged quantum graph: dimension 'instrument' of task 'isr': code out"):
        QuantumGraph.load(tmp_path / "g")
    with pytest.raises(GraphError, match="16 bytes per quantum"):
        QuantumGraph(qg.tasks, qg.task_offsets, qg.data_ids, qg.pred_ptr, qg.pred_idx, qg.ext_ptr, qg.ext_idx, [],
                     external_ids=np.zeros((2, 16), dtype=np.uint8))


def test_native_graphs_are_unchanged(tmp_path: Path) -> None:
    qg = synthetic_graph(1000)
    qg.save(tmp_path / "g")
    back = QuantumGraph.load(tmp_path / "g")
    assert back.vocab == {} and back.external_ids is None and back.external_id(0) is None
    assert back.data_id(0) == qg.data_id(0) and all(isinstance(v, int) for v in back.data_id(5).values())
