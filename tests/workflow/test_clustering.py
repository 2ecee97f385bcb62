from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batchprod.errors import WorkflowError
from batchprod.graph import Registry, build_quantum_graph
from batchprod.pipeline import Pipeline, TaskDef
from batchprod.testing import make_toy_repo
from batchprod.workflow import ClusterSpec, GenericWorkflow, Resources, cluster_quanta


def task(label: str, dims: list[str], inputs: list[str], outputs: list[str]) -> TaskDef:
    return TaskDef(label, tuple(dims), tuple(inputs), tuple(outputs), command="true")


PIPE = Pipeline([
    task("isr", ["visit", "detector"], ["raw"], ["postIsr"]),
    task("calibrate", ["visit", "detector"], ["postIsr"], ["calexp"]),
    task("coadd", ["tract", "patch"], ["calexp"], ["coadd"]),
])


@pytest.fixture
def qg(tmp_path: Path):
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2, 3), detectors=(0, 1))
    return build_quantum_graph(PIPE, Registry(repo / "registry.db"))


def res(label, cluster) -> Resources:
    mem = {"isr": 100, "calibrate": 300, "coadd": 500}.get(label, 1)
    return Resources(request_memory=mem, priority=1 if label == "coadd" else 0)


def parent_names(wf: GenericWorkflow, j: int) -> set[str]:
    return {wf.job_name(int(p)) for p in wf.parents(j)}


def test_default_is_one_quantum_per_job(qg) -> None:
    wf = cluster_quanta(qg, [], res)
    assert len(wf) == len(qg) == 6 + 6 + 2
    assert wf.n_dependencies == qg.n_edges
    j = wf.job_names().index("coadd_tract0_patch1")
    assert parent_names(wf, j) == {f"calibrate_visit{v}_detector1" for v in (1, 2, 3)}
    assert wf.job(j).resources.request_memory == 500


def test_cluster_by_labels_chains_per_data_id(qg) -> None:
    wf = cluster_quanta(qg, [ClusterSpec("single", ("isr", "calibrate"))], res)
    names = wf.job_names()
    assert len(wf) == 6 + 2
    j = names.index("single_visit2_detector0")
    assert sorted(qg.label(int(q)) for q in wf.quanta(j)) == ["calibrate", "isr"]
    assert wf.job(j).resources.request_memory == 300  # the larger of the two tasks
    c = names.index("coadd_tract0_patch0")
    assert parent_names(wf, c) == {f"single_visit{v}_detector0" for v in (1, 2, 3)}
    wf.topological_order()


def test_cluster_by_dimension(qg) -> None:
    wf = cluster_quanta(qg, [ClusterSpec("perVisit", ("isr", "calibrate"), ("visit",))], res)
    names = wf.job_names()
    assert sorted(n for n in names if n.startswith("perVisit")) == [f"perVisit_visit{v}" for v in (1, 2, 3)]
    assert all(len(wf.quanta(names.index(f"perVisit_visit{v}"))) == 4 for v in (1, 2, 3))
    c = names.index("coadd_tract0_patch1")
    assert parent_names(wf, c) == {"perVisit_visit1", "perVisit_visit2", "perVisit_visit3"}
    # quanta inside a job are in dependency order (isr before calibrate of the same data ID)
    for j in range(len(wf)):
        qs = [int(q) for q in wf.quanta(j)]
        assert qs == sorted(qs)


def test_cluster_with_a_gap_creates_a_cycle(qg) -> None:
    with pytest.raises(WorkflowError, match="clustering creates a cycle among jobs of: .*bad"):
        cluster_quanta(qg, [ClusterSpec("bad", ("isr", "coadd"), ())], res)


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        ([ClusterSpec("c", ("nosuch",))], "cluster 'c': unknown task label 'nosuch'"),
        ([ClusterSpec("a", ("isr",)), ClusterSpec("b", ("isr",))], "task 'isr' is in two clusters"),
        ([ClusterSpec("c", ("isr", "coadd"), ("visit",))], "cluster 'c': task 'coadd' has no dimension 'visit'"),
    ],
)
def test_bad_clusters(qg, clusters, message) -> None:
    with pytest.raises(WorkflowError, match=message):
        cluster_quanta(qg, clusters, res)


def test_save_load_round_trip(qg, tmp_path: Path) -> None:
    wf = cluster_quanta(qg, [ClusterSpec("single", ("isr", "calibrate"))], res, run={"repo": "/r", "output_run": "o"})
    wf.save(tmp_path / "w.bpwf")
    wf2 = GenericWorkflow.load(tmp_path / "w.bpwf", qg)
    assert wf2.job_names() == wf.job_names()
    assert all(np.array_equal(wf2.parents(j), wf.parents(j)) for j in range(len(wf)))
    assert wf2.groups == wf.groups
    spec = wf2.job_spec(0)
    assert [q["label"] for q in spec["quanta"]] == ["isr", "calibrate"]
    assert spec["quanta"][1]["inputs"][0]["path"] == spec["quanta"][0]["outputs"][0]["path"]
