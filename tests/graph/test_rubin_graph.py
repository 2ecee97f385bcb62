"""A real Rubin quantum graph: a real Butler repository (sqlite) with pipe_base mock tasks and a fan-in,
a real ``.qg`` made by ``pipetask qgraph``, read into our compact graph with labels, string data IDs,
UUIDs and dependencies intact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from batchprod.errors import GraphError
from batchprod.graph.quantum_graph import QuantumGraph
from batchprod.workflow import Resources, cluster_quanta

MOCK = "lsst.pipe.base.tests.mocks.DynamicTestPipelineTask"


@pytest.fixture(scope="module")
def lsst() -> None:
    try:
        import lsst.pipe.base  # noqa: F401
    except ImportError:
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail("the Rubin middleware is required here (BATCHPROD_REQUIRE_ENGINES=1): pip install '.[rubin]'")
        pytest.skip("no Rubin middleware (pip install 'batchprod[rubin]')")


def _repo(root: Path, detectors: int) -> Path:
    """A Butler repo with instrument Cam, its detectors and one mock input per detector in RUN 'inputs'."""
    from lsst.daf.butler import Butler, DatasetRef, DatasetType
    from lsst.pipe.base.tests.mocks import MockDataset, MockStorageClass

    repo = root / "repo"
    Butler.makeRepo(str(repo))
    with Butler.from_config(str(repo), writeable=True) as butler:
        butler.registry.insertDimensionData("instrument", {
            "name": "Cam", "detector_max": 100, "visit_max": 100, "exposure_max": 100, "visit_system": 0,
            "class_name": "unused.Cam"})
        butler.registry.insertDimensionData(
            "detector", *[{"instrument": "Cam", "id": d, "full_name": f"D{d}"} for d in range(detectors)])
        dims = ["instrument", "detector"]
        dt = DatasetType("raw_in", dims, MockStorageClass.get_or_register_mock("StructuredDataDict"),
                         universe=butler.dimensions)
        butler.registry.registerDatasetType(dt)
        butler.collections.register("inputs")
        for data_id in butler.query_data_ids(dims, explain=False):
            ref = DatasetRef(dt, butler.registry.expandDataId(data_id), run="inputs")
            butler.put(MockDataset(dataset_id=ref.id, dataset_type=dt.to_simple(), data_id=dict(ref.dataId.mapping),
                                   run="inputs"), ref)
    return repo


def _pipeline(path: Path) -> Path:
    """a, b per (instrument, detector); c gathers every b of the instrument."""
    def task(label: str, dims: str, inp: str, out: str, out_dims: str, multiple: bool = False) -> str:
        body = ("from lsst.pipe.base.tests.mocks import DynamicConnectionConfig\n"
                f"config.dimensions = {out_dims}\n"
                f'config.inputs["input"] = DynamicConnectionConfig(dataset_type_name="{inp}", dimensions={dims}, '
                f"multiple={multiple})\n"
                f'config.outputs["output"] = DynamicConnectionConfig(dataset_type_name="{out}", '
                f"dimensions={out_dims})\n")
        return f"  {label}:\n    class: {MOCK}\n    config:\n      python: |\n" + textwrap.indent(body, " " * 8)

    d = '["instrument", "detector"]'
    path.write_text("description: mock a -> b -> c\ntasks:\n" + task("a", d, "raw_in", "a_out", d)
                    + task("b", d, "a_out", "b_out", d) + task("c", d, "b_out", "c_out", '["instrument"]', True))
    return path


@pytest.fixture(scope="module")
def rubin_qg(lsst: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rubin")
    repo = _repo(root, detectors=4)
    pipetask = Path(sys.executable).parent / "pipetask"
    qg = root / "g.qg"
    p = subprocess.run([str(pipetask), "qgraph", "-b", str(repo), "-p", str(_pipeline(root / "pipeline.yaml")),
                        "-i", "inputs", "-o", "u/test/out", "--output-run", "u/test/out/run1",
                        "--qgraph-datastore-records", "--save-qgraph", str(qg)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return qg


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
