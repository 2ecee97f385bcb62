from __future__ import annotations

from pathlib import Path

import pytest

from batchprod.errors import GraphError, PipelineError
from batchprod.graph import QuantumGraph, Registry, build_quantum_graph
from batchprod.pipeline import Pipeline, TaskDef
from batchprod.testing import make_toy_repo

OVERLAPS = {(1, 0): [0], (1, 1): [0, 1], (2, 0): [1], (2, 1): [1]}


def task(label: str, dims: list[str], inputs: list[str], outputs: list[str]) -> TaskDef:
    return TaskDef(label, tuple(dims), tuple(inputs), tuple(outputs), command="true")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    repo = make_toy_repo(tmp_path / "repo", overlaps=OVERLAPS)
    reg = Registry(repo / "registry.db")
    reg.register_dataset_type("bias", ["detector"])
    reg.insert_datasets("bias", "calib", [({"detector": d}, f"bias_{d}.txt", None, None) for d in (0, 1)])
    return reg


PIPE = Pipeline([
    task("coadd", ["tract", "patch"], ["calexp"], ["coadd"]),
    task("calibrate", ["visit", "detector"], ["raw", "bias"], ["calexp"]),
    task("visitSummary", ["visit"], ["calexp"], ["summary"]),
])


def preds(qg: QuantumGraph, q: int) -> set[tuple[str, tuple]]:
    return {(qg.label(int(p)), tuple(qg.data_id(int(p)).values())) for p in qg.predecessors(q)}


def test_fan_in_edges_are_exactly_the_overlaps(registry: Registry) -> None:
    qg = build_quantum_graph(PIPE, registry)
    assert [t.label for t in qg.tasks] == ["calibrate", "coadd", "visitSummary"]  # topological order
    assert qg.counts() == {"calibrate": 4, "coadd": 2, "visitSummary": 2}
    coadds = {tuple(qg.data_id(q).values()): q for q in qg.quanta_of("coadd")}
    assert preds(qg, coadds[(0, 0)]) == {("calibrate", (1, 0)), ("calibrate", (1, 1))}
    assert preds(qg, coadds[(0, 1)]) == {("calibrate", (1, 1)), ("calibrate", (2, 0)), ("calibrate", (2, 1))}
    summaries = {qg.data_id(q)["visit"]: q for q in qg.quanta_of("visitSummary")}
    assert preds(qg, summaries[2]) == {("calibrate", (2, 0)), ("calibrate", (2, 1))}
    assert qg.n_edges == 2 + 3 + 4
    # each calibrate reads its raw and the bias of its detector (broadcast), from the registry
    q = next(q for q in qg.quanta_of("calibrate") if qg.data_id(q) == {"visit": 2, "detector": 1})
    ins = {(r.dataset_type, tuple(r.data_id.items())) for r in qg.inputs(q, "/repo", "run")}
    assert ins == {("raw", (("detector", 1), ("visit", 2))), ("bias", (("detector", 1),))}
    # fan-out: one calexp feeds the coadd of each patch it overlaps and its visit summary
    c11 = next(q for q in qg.quanta_of("calibrate") if qg.data_id(q) == {"visit": 1, "detector": 1})
    assert sorted(qg.label(int(s)) for s in qg.successors(c11)) == ["coadd", "coadd", "visitSummary"]


def test_query_restricts_every_level(registry: Registry) -> None:
    qg = build_quantum_graph(PIPE, registry, "visit = 1 AND detector != 1")
    assert qg.counts() == {"calibrate": 1, "coadd": 1, "visitSummary": 1}
    (c,) = qg.quanta_of("coadd")
    assert preds(qg, c) == {("calibrate", (1, 0))}


def test_missing_broadcast_input_drops_the_quantum(registry: Registry, tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "r2", detectors=(0, 1, 2))
    reg = Registry(repo / "registry.db")
    reg.register_dataset_type("bias", ["detector"])
    reg.insert_datasets("bias", "calib", [({"detector": 0}, "b.txt", None, None)])
    qg = build_quantum_graph(Pipeline([task("calibrate", ["visit", "detector"], ["raw", "bias"], ["calexp"])]), reg)
    assert {qg.data_id(q)["detector"] for q in range(len(qg))} == {0}


def test_stable_ids_and_round_trip(registry: Registry, tmp_path: Path) -> None:
    a = build_quantum_graph(PIPE, registry)
    b = build_quantum_graph(PIPE, registry)
    assert [a.node_id(q) for q in range(len(a))] == [b.node_id(q) for q in range(len(b))]
    assert len({a.node_id(q) for q in range(len(a))}) == len(a)
    a.save(tmp_path / "g.bpqg")
    c = QuantumGraph.load(tmp_path / "g.bpqg")
    assert [c.node_id(q) for q in range(len(c))] == [a.node_id(q) for q in range(len(a))]
    assert [list(c.predecessors(q)) for q in range(len(c))] == [list(a.predecessors(q)) for q in range(len(a))]
    assert c.inputs(5, "/r", "x") == a.inputs(5, "/r", "x")
    c.topological_order()


def test_corrupt_graph_file(tmp_path: Path) -> None:
    (tmp_path / "g.bpqg").write_bytes(b"not a zip")
    with pytest.raises(GraphError, match="cannot read quantum graph"):
        QuantumGraph.load(tmp_path / "g.bpqg")


def test_pipeline_cycle() -> None:
    with pytest.raises(PipelineError, match="pipeline has a cycle"):
        Pipeline([task("a", ["visit"], ["y"], ["x"]), task("b", ["visit"], ["x"], ["y"])])


def test_dataset_type_produced_twice() -> None:
    with pytest.raises(PipelineError, match="dataset type 'x' is produced by both 'a' and 'b'"):
        Pipeline([task("a", ["visit"], ["raw"], ["x"]), task("b", ["visit"], ["raw"], ["x"])])


def test_unproducible_input(registry: Registry) -> None:
    p = Pipeline([task("a", ["visit", "detector"], ["flat"], ["x"])])
    with pytest.raises(PipelineError, match="task 'a': input dataset type 'flat' is produced by no task and not in the registry"):
        build_quantum_graph(p, registry)


def test_unrelated_dimensions(registry: Registry) -> None:
    p = Pipeline([task("a", ["visit", "detector"], ["raw"], ["x"]), task("b", ["skypix"], ["x"], ["y"])])
    with pytest.raises(GraphError, match="task 'b': input 'x' has dimensions .* register a dimension relation"):
        build_quantum_graph(p, registry)


def test_empty_query_result(registry: Registry) -> None:
    with pytest.raises(GraphError, match="selects no input data"):
        build_quantum_graph(PIPE, registry, "visit = 99")
