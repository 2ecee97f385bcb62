"""ctrl_bps semantics of a Rubin run's workflow, without lsst: search order, cluster values, summed
walltime, a cluster without dimensions as one job, pipetaskInit first, the final job's commands,
defaults of bps_defaults.yaml, variables, and keys we do not support."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from batchprod.config import Context, load_config
from batchprod.errors import ConfigError
from batchprod.graph.synthetic import synthetic_graph
from batchprod.workflow.rubin import INIT, rubin_workflow

DIMS = "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering"
CUR = {"qgraphFile": "/sub/rubin.qg", "butlerConfig": "/repo"}


def _cfg(tmp_path: Path, extra: dict[str, Any]) -> Any:
    data = {"qgraphFile": "g.qg", "payload": {"payloadName": "t", "butlerConfig": "/repo"}, **extra}
    p = tmp_path / "bps.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_config(p)


def _graph() -> Any:
    qg = synthetic_graph(400, detectors=4)  # isr, calibrate per (visit, detector); coadd, measure per (tract, patch)
    qg.external_ids = np.arange(len(qg) * 16, dtype=np.int64).astype(np.uint8).reshape(len(qg), 16)
    return qg


def _wf(tmp_path: Path, extra: dict[str, Any]) -> Any:
    return rubin_workflow(_graph(), _cfg(tmp_path, extra), {"repo": "/repo", "output_run": "u/o", "protocol": "butler"},
                          CUR)


def test_defaults_are_ctrl_bps_own(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {})
    s = cfg.job_settings(Context(label="isr"))
    assert (s["numberOfRetries"], s["memoryMultiplier"], s["requestMemory"], s["retryUnlessExit"]) == (5, 2.0, 2048, [1, 2])
    wf = _wf(tmp_path, {})
    assert (wf.final.resources.request_cpus, wf.final.resources.request_memory) == (16, 32768)
    command = wf.final_spec()["final"]["command"]
    assert command.startswith("butler --long-log --log-level=VERBOSE aggregate-graph /sub/rubin.qg /repo -j 16 ")
    assert "--register-dataset-types --update-output-chain" in command
    assert cfg.get("outputRun").startswith("u/") and cfg.rubin


def test_search_order_payload_cluster_pipetask_site_top(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"requestMemory": 100, "site": {"local": {"requestMemory": 200}},
                          "pipetask": {"isr": {"requestMemory": 300}},
                          "cluster": {"c": {"pipetasks": "isr", "requestMemory": 400}},
                          "clusterAlgorithm": DIMS})
    assert cfg.get("requestMemory", Context(label="calibrate")) == 200  # site over top level
    assert cfg.get("requestMemory", Context(label="isr")) == 300  # pipetask over site
    assert cfg.get("requestMemory", Context(label="isr", cluster="c")) == 400  # cluster over pipetask (ctrl_bps)
    cfg = _cfg(tmp_path, {"pipetask": {"isr": {"requestMemory": 300}}})
    cfg.data["payload"]["requestMemory"] = 500
    cfg._cache.clear()
    assert cfg.get("requestMemory", Context(label="isr")) == 500  # payload first of all


def test_a_cluster_own_values_win_and_walltime_sums_over_its_quanta(tmp_path: Path) -> None:
    wf = _wf(tmp_path, {"clusterAlgorithm": DIMS,
                        "pipetask": {"isr": {"requestMemory": 3000, "requestWalltime": 60, "requestDisk": 10},
                                     "calibrate": {"requestMemory": 5000, "requestWalltime": 100}},
                        "cluster": {"visit": {"pipetasks": "isr, calibrate", "dimensions": "visit"},
                                    "own": {"pipetasks": "coadd", "dimensions": "tract, patch", "requestMemory": 700}}})
    g = {x.name: x for x in wf.groups}
    assert g["visit"].resources.request_memory == 5000  # the largest of its tasks
    assert g["own"].resources.request_memory == 700  # its own value wins
    j = wf.job_names().index("visit_visit0")
    assert len(wf.quanta(j)) == 8  # 4 detectors x 2 tasks
    assert wf.job_walltime[j] == 4 * 60 + 4 * 100  # the sum over the job's quanta
    assert wf.job_disk[j] == 4 * 10  # requestDisk too
    assert wf.job_walltime[wf.job_names().index("measure_tract0_patch0")] == 0  # no walltime asked


def test_a_cluster_without_dimensions_is_one_job(tmp_path: Path) -> None:
    wf = _wf(tmp_path, {"clusterAlgorithm": DIMS, "cluster": {"all": {"pipetasks": "coadd, measure"}}})
    names = wf.job_names()
    assert names.count("all") == 1
    qg = _graph()
    assert len(wf.quanta(names.index("all"))) == len(qg.quanta_of("coadd")) + len(qg.quanta_of("measure"))


def test_pipetask_init_runs_first_and_each_job_runs_its_node_ids(tmp_path: Path) -> None:
    wf = _wf(tmp_path, {"extraRunQuantumOptions": "--no-versions"})
    assert wf.job_names()[0] == INIT and len(wf.quanta(0)) == 0
    assert wf.group(0).command.startswith("pipetask --long-log --log-level=VERBOSE pre-exec-init-qbb /repo /sub/rubin.qg")
    roots = [j for j in range(1, len(wf)) if list(wf.parents(j)) == [0]]
    assert all(wf.group(j).name == "isr" for j in roots) and len(roots) == len(wf.qgraph.quanta_of("isr"))
    order = wf.topological_order().tolist()
    assert order[0] == 0
    spec = wf.job_spec(1)
    assert spec["protocol"] == "butler" and spec["command"].endswith(f"--qgraph-node-id {spec['quanta'][0]['node_id']} "
                                                                      "--no-versions")
    assert spec["quanta"][0]["inputs"] == [] and spec["quanta"][0]["datasets"] == ["postIsr"]


def test_final_job_commands_and_when_run_never(tmp_path: Path) -> None:
    wf = _wf(tmp_path, {"finalJob": {"command2": "echo {payloadName} done", "requestCpus": 2}})
    assert wf.final.command.splitlines()[1] == "echo t done"
    assert " -j 2 " in wf.final_spec()["final"]["command"].splitlines()[0]  # {requestCpus}: the final job's own
    assert _wf(tmp_path, {"finalJob": {"whenRun": "NEVER"}}).final is None


def test_variables_format_specs_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_TEST_X", "ex")
    cfg = _cfg(tmp_path, {"patch": 69, "dataQuery": "patch = {patch:03} AND x = '$BP_TEST_X' AND y = '${BP_TEST_X}'",
                          "runQuantumCommand": "$BP_TEST_X/pipetask run-qbb {butlerConfig} {qgraphFile} "
                                               "--qgraph-node-id {qgraphNodeId}"})
    assert cfg.get("dataQuery") == "patch = 069 AND x = 'ex' AND y = 'ex'"
    # a command keeps $ENV for the job's shell (never baked into the submit directory)
    assert cfg.render("runQuantumCommand", Context(), CUR).startswith("$BP_TEST_X/pipetask run-qbb /repo /sub/rubin.qg")


@pytest.mark.parametrize(("extra", "message"), [
    ({"pacth": 3, "dataQuery": "patch = {patch}"}, "unknown key 'pacth' (did you mean 'patch'?)"),
    ({"computeCloud": "x"}, "key 'computeCloud': ctrl_bps key not supported by batchprod: clouds are PanDA's"),
    ({"pipetask": {"isr": {"queue": "q"}}}, "key 'pipetask.isr.queue': ctrl_bps key not supported"),
    ({"cluster": {"c": {"pipetasks": "isr", "profile": {}}}}, "key 'cluster.c.profile': ctrl_bps key not supported"),
    ({"cluster": {"c": {"pipetasks": "isr", "findDependencyMethod": "up"}}}, "only source or sink here"),
    ({"whenSaveJobQgraph": "TRANSFORM"}, "batchprod supports only NEVER here"),
    ({"finalJob": {"whenRun": "SOMETIMES"}}, "expected ALWAYS, SUCCESS or NEVER"),
])
def test_keys_we_do_not_support_are_named(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(tmp_path, extra)


def test_queue_is_a_slurm_sites_partition(tmp_path: Path) -> None:
    """ctrl_bps's queue: on a Slurm compute site, its partition (said in a note); on a local site there
    is no queue, and it is refused by name."""
    from batchprod.wms.settings import site_settings
    from batchprod.wms.slurm import SlurmSettings

    slurm = {"computeSite": "hpc", "site": {"hpc": {"wmsServiceClass": "slurm"}}}
    for extra in ({**slurm, "queue": "debug"}, {"computeSite": "hpc",
                                                "site": {"hpc": {"wmsServiceClass": "slurm", "queue": "debug"}}}):
        cfg = _cfg(tmp_path, extra)
        assert site_settings(cfg, SlurmSettings).partition == "debug"
        assert any("is Slurm site 'hpc''s partition" in n for n in cfg.notes)
    refused = re.escape("key 'queue': ctrl_bps key not supported by batchprod: a queue is a Slurm site's partition")
    for extra in ({"queue": "debug"},  # the default local site
                  {**slurm, "queue": "debug", "site": {"hpc": {"wmsServiceClass": "slurm", "partition": "x"}}}):
        with pytest.raises(ConfigError, match=refused):  # (a site's own partition is not overridden silently)
            _cfg(tmp_path, extra)


def test_clusters_need_dimension_clustering(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="clusters apply only with clusterAlgorithm"):
        _wf(tmp_path, {"cluster": {"c": {"pipetasks": "isr"}}})


def test_retry_unless_exit_stops_retries_for_those_codes() -> None:
    from batchprod.execution.policy import JobCounters, decide
    from batchprod.execution.states import FailureClass
    from batchprod.workflow.generic import Resources

    res = Resources(number_of_retries=5, retry_unless_exit=(1, 2))
    assert not decide(FailureClass.USER_ERROR, res, JobCounters(), 100, 1000, exit_code=1).retry
    assert decide(FailureClass.USER_ERROR, res, JobCounters(), 100, 1000, exit_code=3).retry


def test_environment_is_exported_in_each_job(tmp_path: Path) -> None:
    import subprocess

    wf = _wf(tmp_path, {"environment": {"BP_TAG": "{payloadName}-x", "BP_HOME": "${HOME}/y", "BP_Q": 'a"b'},
                        "pipetask": {"isr": {"environment": {"BP_TAG": "isr-only"}}},
                        "runQuantumCommand": 'echo "$BP_TAG|$BP_HOME|$BP_Q" {qgraphNodeId}'})
    isr = wf.job_spec(wf.job_names().index("isr_visit0_detector0"))["command"]
    cal = wf.job_spec(wf.job_names().index("calibrate_visit0_detector0"))["command"]
    run = lambda cmd: subprocess.run(["/bin/bash", "-c", cmd], capture_output=True, text=True,  # noqa: E731
                                     env={"HOME": "/h", "PATH": "/usr/bin:/bin"}).stdout.split()[0]
    assert run(isr) == "isr-only||"  # the first environment section the search finds wins, whole
    assert run(cal) == 't-x|/h/y|a"b'  # variables filled now, ${HOME} on the node


def test_an_environment_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'pipetask.isr.environment': expected a mapping"):
        _cfg(tmp_path, {"pipetask": {"isr": {"environment": "X=1"}}})
    with pytest.raises(ConfigError, match=r"key 'environment.1X': not a usable environment variable name"):
        _cfg(tmp_path, {"environment": {"1X": "v"}})


def test_partition_dimensions_cut_each_cluster_as_ctrl_bps_does(tmp_path: Path) -> None:
    base = {"clusterAlgorithm": DIMS}
    wf = _wf(tmp_path, {**base, "cluster": {"v": {"pipetasks": "isr, calibrate", "dimensions": "visit",
                                                  "partitionDimensions": "detector", "partitionMaxSize": 3}}})
    names = wf.job_names()
    assert "v_visit0_001" in names and "v_visit0_002" in names and "v_visit0_003" not in names
    data = [wf.qgraph.data_id(int(q))["detector"] for q in wf.quanta(names.index("v_visit0_001"))]
    assert sorted(set(data)) == [0, 1, 2] and len(data) == 6  # detectors 0-2 of isr and calibrate
    assert len(names) == len(set(names))
    same = _wf(tmp_path, {**base, "cluster": {"v": {"pipetasks": "isr, calibrate", "dimensions": "visit",
                                                    "partitionDimensions": "detector", "partitionMaxSize": 3,
                                                    "findDependencyMethod": "sink"}}})
    assert same.job_names() == names and (same.job_qidx == wf.job_qidx).all()  # it changes no cluster
    n_visits = len(wf.qgraph.quanta_of("isr")) // 4
    wf = _wf(tmp_path, {**base, "cluster": {"v": {"pipetasks": "isr, calibrate", "dimensions": "visit",
                                                  "partitionDimensions": "detector",
                                                  "partitionMaxClusters": 2 * n_visits}}})
    assert sum(n.startswith("v_") for n in wf.job_names()) == 2 * n_visits  # 2 parts of 2 detectors per visit
    with pytest.raises(ConfigError, match="needs exactly one of partitionMaxClusters or partitionMaxSize"):
        _wf(tmp_path, {**base, "cluster": {"v": {"pipetasks": "isr", "partitionDimensions": "detector"}}})


def test_equal_dimensions_join_tasks_that_name_a_dimension_differently(tmp_path: Path) -> None:
    import dataclasses

    from batchprod.workflow.rubin import rubin_workflow

    qg = _graph()
    qg.tasks[0] = dataclasses.replace(qg.tasks[0], dimensions=("exposure", "detector"))  # isr per exposure
    cfg = _cfg(tmp_path, {"clusterAlgorithm": DIMS, "cluster": {"v": {
        "pipetasks": "isr, calibrate", "dimensions": "visit", "equalDimensions": "visit:exposure"}}})
    wf = rubin_workflow(qg, cfg, {"repo": "/r", "output_run": "o", "protocol": "butler"}, CUR)
    j = wf.job_names().index("v_visit3")
    assert sorted(qg.label(int(q)) for q in wf.quanta(j)) == ["calibrate"] * 4 + ["isr"] * 4
    cfg = _cfg(tmp_path, {"clusterAlgorithm": DIMS, "cluster": {"v": {"pipetasks": "isr, calibrate",
                                                                      "dimensions": "visit"}}})
    from batchprod.errors import WorkflowError

    with pytest.raises(WorkflowError, match="task 'isr' has no dimension 'visit'"):
        rubin_workflow(qg, cfg, {"repo": "/r", "output_run": "o", "protocol": "butler"}, CUR)


def test_a_ctrl_bps_wms_plugin_is_named_with_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a ctrl_bps plugin; batchprod runs the jobs itself: give wmsServiceClass"):
        _cfg(tmp_path, {"wmsServiceClass": "lsst.ctrl.bps.htcondor.HTCondorService"})


def test_ctrl_bps_parsl_local_site_is_our_parsl_site(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"wmsServiceClass": "lsst.ctrl.bps.parsl.ParslService", "computeSite": "local",
                          "site": {"local": {"class": "lsst.ctrl.bps.parsl.sites.Local", "cores": 2}}})
    assert cfg.data["site"]["local"] == {"wmsServiceClass": "parsl", "parslProvider": "local", "maxWorkers": 2}
    from batchprod.wms.settings import settings_for

    s = settings_for(cfg)
    assert (s.provider, s.max_workers) == ("local", 2)
    with pytest.raises(ConfigError, match=r"key 'site.tiger.class': ctrl_bps key not supported by batchprod: a "
                                          r"ctrl_bps_parsl site class other than"):
        _cfg(tmp_path, {"site": {"tiger": {"class": "lsst.ctrl.bps.parsl.sites.princeton.Tiger"}}})


def test_payload_variables_and_task_labels(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"payload": {"payloadName": "t", "butlerConfig": "/repo", "weekly": "w_2026_47",
                                      "output": "u/{operator}/{weekly}/{payloadName}"}})
    assert "/w_2026_47/t" in cfg.get("output")
    with pytest.raises(ConfigError, match="unknown key 'payload.wekly'"):
        _cfg(tmp_path, {"payload": {"payloadName": "t", "butlerConfig": "/repo", "wekly": "x"}})
    with pytest.raises(ConfigError, match=r"key 'pipetask.zz': the graph has no task 'zz' \(tasks: calibrate"):
        _wf(tmp_path, {"pipetask": {"zz": {"requestMemory": 10}}})


def test_a_pipetask_init_section_of_the_file_merges_with_ctrl_bps_defaults(tmp_path: Path) -> None:
    wf = _wf(tmp_path, {"pipetask": {"pipetaskInit": {"requestMemory": 512}}})
    init = wf.group(0)
    assert init.resources.request_memory == 512 and " pre-exec-init-qbb " in init.command


def test_native_files_keep_their_meaning_of_braces_and_dollars(tmp_path: Path, toy_repo: Path) -> None:
    from batchprod.testing import write_submit

    cfg = load_config(write_submit(tmp_path, repo=toy_repo, project="a {x: 1} $HOME b"))
    assert cfg.get("project") == "a {x: 1} $HOME b" and not cfg.rubin
