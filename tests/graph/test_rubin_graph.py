"""A real Rubin quantum graph: a real Butler repository (sqlite) with pipe_base mock tasks and a fan-in,
a real ``.qg`` made by ``pipetask qgraph``, read into our compact graph with labels, string data IDs,
UUIDs and dependencies intact."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from batchprod.errors import GraphError
from batchprod.graph.quantum_graph import QuantumGraph
from batchprod.workflow import Resources, cluster_quanta


@pytest.fixture(scope="module")
def lsst() -> None:
    try:
        import lsst.pipe.base  # noqa: F401
    except ImportError:
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail("the Rubin middleware is required here (BATCHPROD_REQUIRE_ENGINES=1): pip install '.[rubin]'")
        pytest.skip("no Rubin middleware (pip install 'batchprod[rubin]')")


@pytest.fixture(scope="module")
def rubin_qg(lsst: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rubin")
    from batchprod.testing_rubin import fan_in_pipeline, make_qgraph, rubin_repo

    repo = rubin_repo(root, detectors=4)
    return make_qgraph(repo, fan_in_pipeline(root / "pipeline.yaml"), root / "g.qg", output_run="u/test/out/run1")


def test_a_real_graph_keeps_labels_data_ids_uuids_and_edges(rubin_qg: Path, tmp_path: Path) -> None:
    from lsst.pipe.base.pipeline_graph import TaskImportMode
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    from batchprod.graph.rubin import read_rubin_qgraph

    g = read_rubin_qgraph(rubin_qg)
    assert g.counts() == {"a": 4, "b": 4, "c": 1}
    assert g.vocab == {"instrument": ["Cam"]} and g.metadata["output_run"] == "u/test/out/run1"
    assert [g.data_id(q) for q in g.quanta_of("a")] == [{"instrument": "Cam", "detector": d} for d in range(4)]
    (c,) = g.quanta_of("c")
    assert g.data_id(c) == {"instrument": "Cam"} and sorted(g.predecessors(c).tolist()) == list(g.quanta_of("b"))
    # the same quanta and edges as pipe_base sees them, by UUID
    with PredictedQuantumGraph.open(str(rubin_qg), import_mode=TaskImportMode.DO_NOT_IMPORT) as r:
        r.read_thin_graph()
        xg = r.finish().quantum_only_xgraph
    for u, attrs in xg.nodes(data=True):
        q = g.quantum_of(str(u))
        assert g.label(q) == attrs["task_label"] and g.data_id(q) == dict(attrs["data_id"].required)
        assert {uuid.UUID(g.external_id(int(p))) for p in g.predecessors(q)} == set(xg.predecessors(u))
    # converted once: our file, read back without lsst; clustered into jobs with readable names
    g.save(tmp_path / "qgraph")
    back = QuantumGraph.load(tmp_path / "qgraph")
    assert [back.data_id(q) for q in range(len(back))] == [g.data_id(q) for q in range(len(g))]
    wf = cluster_quanta(back, [], lambda label, cluster: Resources(), run={"repo": "r", "output_run": "o"})
    assert "a_instrumentCam_detector2" in wf.job_names() and "c_instrumentCam" in wf.job_names()


def test_a_file_that_is_not_a_graph_is_one_line(lsst: None, tmp_path: Path) -> None:
    from batchprod.graph.rubin import read_rubin_qgraph

    bad = tmp_path / "g.qg"
    bad.write_bytes(b"not a zip")
    with pytest.raises(GraphError, match=rf"^{bad}: cannot read the Rubin quantum graph: "):
        read_rubin_qgraph(bad)
    with pytest.raises(GraphError, match="quantum graph file not found"):
        read_rubin_qgraph(tmp_path / "none.qg")


def _same(a: QuantumGraph, b: QuantumGraph) -> None:
    assert a.counts() == b.counts() and a.vocab == b.vocab
    assert (a.pred_ptr == b.pred_ptr).all() and (a.pred_idx == b.pred_idx).all()
    assert (a.external_ids == b.external_ids).all()
    assert [a.data_id(q) for q in range(len(a))] == [b.data_id(q) for q in range(len(b))]


def test_the_scanned_thin_graph_is_pipe_bases_model_exactly(rubin_qg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block scanner (arrays, no object per quantum) and pipe_base's model give one graph; a block
    the scanner does not recognise (here: pretty-printed) falls back to the model, same result."""
    import json

    from lsst.pipe.base.quantum_graph._common import BaseQuantumGraphReader

    from batchprod.graph import rubin

    scanned = rubin.read_rubin_qgraph(rubin_qg)
    with monkeypatch.context() as m:
        m.setattr(rubin, "_scan_thin", lambda reader, required: None)
        modelled = rubin.read_rubin_qgraph(rubin_qg)
    _same(scanned, modelled)
    raw_block = BaseQuantumGraphReader._read_single_block_raw
    seen: list[object] = []

    def pretty(self: object, name: str) -> bytes:
        data = raw_block(self, name)
        return json.dumps(json.loads(data), indent=1).encode() if name == "thin_graph" else data

    def spy(reader: object, required: dict[str, int]) -> object:
        seen.append(result := scan(reader, required))
        return result

    scan = rubin._scan_thin
    monkeypatch.setattr(BaseQuantumGraphReader, "_read_single_block_raw", pretty)
    monkeypatch.setattr(rubin, "_scan_thin", spy)
    _same(rubin.read_rubin_qgraph(rubin_qg), scanned)
    assert seen == [None]


def test_an_edge_to_a_quantum_not_in_the_graph_is_one_line(rubin_qg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lsst.pipe.base.quantum_graph._common import BaseQuantumGraphReader

    from batchprod.graph import rubin

    raw_block = BaseQuantumGraphReader._read_single_block_raw

    def damaged(self: object, name: str) -> bytes:
        data = raw_block(self, name)
        if name != "thin_graph":
            return data
        head, edges = data.split(b',"edges":[["', 1)
        return head + b',"edges":[["' + b"0" * 8 + edges[8:]
    monkeypatch.setattr(BaseQuantumGraphReader, "_read_single_block_raw", damaged)
    with pytest.raises(GraphError, match=rf"^{rubin_qg}: damaged Rubin quantum graph: an edge names a quantum"):
        rubin.read_rubin_qgraph(rubin_qg)
