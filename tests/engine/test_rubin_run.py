"""A Rubin run end to end, as a ctrl_bps user switches to batchprod: a real Butler repository (sqlite),
a real pipeline of pipe_base mock tasks with a fan-in, a real ``.qg``; pipetaskInit, run-qbb jobs
and aggregate-graph, on the local backend and on Slurm. A quantum made to fail is reported with its
data ID and error line; after the fix, restart runs only what is left, and the outputs are in the
Butler (``butler query-datasets``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchprod.errors import ConfigError
from batchprod.state.run import Run
from batchprod.testing import use_slurm


def _submit_file(r: dict[str, Any], extra: dict[str, Any]) -> Path:
    """A ctrl_bps submit file as a Rubin user writes it (plus the site to run on)."""
    cfg = {
        "qgraphFile": str(r["qg"]),
        "payload": {"payloadName": "test", "butlerConfig": str(r["repo"]), "inCollection": "inputs",
                    "output": "u/test/out", "outputRun": "u/test/out/run1"},
        "clusterAlgorithm": "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering",
        # a and b of one detector in one job: one run-qbb call with both node ids
        "cluster": {"ab": {"pipetasks": "a, b", "dimensions": "detector", "requestMemory": 512}},
        # mock tasks: aggregate-graph needs their storage classes; 1 core / 1 GB fit any test machine
        "finalJob": {"requestCpus": 1, "requestMemory": 1024, "extraAggregateOptions": "--mock-storage-classes"},
        "submitPath": str(r["root"] / "submit" / "{outputRun}"),
        **extra,
    }
    path = r["root"] / "bps.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_end_to_end(cli: Any, r: dict[str, Any], site: dict[str, Any]) -> None:
    from batchprod.testing_rubin import query_datasets

    res = cli("submit", _submit_file(r, site))
    assert res.exit_code == 1, res.output  # a failed run
    run = Run(r["root"] / "submit" / "u/test/out/run1")
    wf = run.workflow
    # pipetaskInit first, a+b clustered per detector, c, then the final job
    assert [g.name for g in wf.groups] == ["ab", "c", "pipetaskInit"]
    assert wf.job_names()[0] == "pipetaskInit" and len(wf) == 1 + 4 + 1
    jobs = {j["name"]: j for j in run.store.jobs()}
    assert jobs["pipetaskInit"]["status"] == "SUCCEEDED"
    assert jobs["ab_detector1"]["status"] == "FAILED" and jobs["ab_detector1"]["failure_class"] == "user_error"
    assert jobs["c_instrumentCam"]["status"] == "UNREADY"
    assert sum(j["status"] == "SUCCEEDED" for n, j in jobs.items() if n.startswith("ab_")) == 3
    # run-qbb exits 1 for a failed quantum: ctrl_bps's retryUnlessExit [1, 2] means no retry
    assert jobs["ab_detector1"]["attempts"] == 1
    # one run-qbb call per job with all its node ids (sorted), and the quantum's data ID + error in the report
    spec = wf.job_spec(wf.job_names().index("ab_detector1"))
    ids = [q["node_id"] for q in spec["quanta"]]
    assert len(ids) == 2 and f"--qgraph-node-id {','.join(sorted(ids))}" in spec["command"]
    assert " run-qbb " in spec["command"] and str(run.submit_dir / "rubin.qg") in spec["command"]
    res = cli("logs", run.submit_dir, "b")  # a task label inside a cluster: its jobs are named
    assert "no job named 'b' (jobs named 'ab_detector0', 'ab_detector1', 'ab_detector2', ...)" in res.output
    res = cli("report", run.submit_dir, "--job", "pipetaskInit")  # (exit 1: the run failed)
    assert "pipetaskInit  label pipetaskInit" in res.output and "SUCCEEDED" in res.output, res.output
    res = cli("report", run.submit_dir, "--failures")
    assert "b {instrument: 'Cam', detector: 1}: ValueError: Simulated failure" in res.output.replace("\n", " ")
    # the final job ran (whenRun ALWAYS) and brought the 3 good detectors' outputs into the registry
    assert jobs["finalJob"]["status"] == "SUCCEEDED"
    assert len(query_datasets(r["repo"], "b_out", "u/test/out/run1")) == 3
    assert query_datasets(r["repo"], "c_out", "u/test/out/run1") == []

    r["switch"].unlink()  # the fix
    res = cli("restart", run.submit_dir)
    assert res.exit_code == 0, res.output
    attempts = run.store.attempts()
    # only what was left: detector 1's job (2nd attempt), the gather (1st), and the final job again
    assert sorted(a["job_id"] for a in attempts if a["number"] == 2) == [wf.job_names().index("ab_detector1"), len(wf)]
    assert [a["number"] for a in attempts if a["job_id"] == wf.job_names().index("c_instrumentCam")] == [1]
    assert len(attempts) == 1 + 4 + 1 + 1 + 2  # first execution: init, 4 ab, final; restart: ab1, c, final
    assert {j["status"] for j in run.store.jobs()} == {"SUCCEEDED"}
    assert len(query_datasets(r["repo"], "b_out", "u/test/out/run1")) == 4
    assert len(query_datasets(r["repo"], "c_out", "u/test/out/run1")) == 1
    assert len(query_datasets(r["repo"], "a_out", "u/test/out")) == 4  # through the output chain
    # provenance: each quantum's node id and the dataset refs it made, from the run's own state
    outs = run.store.outputs(wf.job_names().index("ab_detector1"))
    by_node: dict[str, set[str]] = {}
    for o in outs:
        by_node.setdefault(o["node_id"], set()).add(o["dataset_type"])
    assert sorted(by_node) == sorted(ids)  # each quantum's own datasets: outputs, metadata, log
    assert sorted(by_node.values(), key=sorted) == [{"a_out", "a_metadata", "a_log"}, {"b_out", "b_metadata", "b_log"}]
    assert {o["dataset_type"] for o in run.store.outputs()} >= {"a_out", "b_out", "c_out", "c_metadata"}
    res = cli("provenance", run.submit_dir, "c_out:instrument=Cam")
    assert res.exit_code == 0, res.output
    assert "in the Butler (quantum " in res.output and "<- ab_detector1" in res.output, res.output
    rec = json.loads(cli("provenance", run.submit_dir, "c_out:instrument=Cam", "--json").output)
    assert rec["run"]["pipeline"]["path"].endswith("rubin.qg") and rec["run"]["pipeline"]["sha256"]
    res = cli("provenance", run.submit_dir, "a_out:instrument=Cam,detector=2", "--verify")
    assert "raw_in  <- Butler (inputs)" in res.output and "verify    in-butler" in res.output, res.output
    assert res.exit_code == 0  # a Butler's dataset is not "missing" from batchprod's files
    result = json.loads(next((run.submit_dir / "logs" / "ab").glob("ab_detector1.2.result.json")).read_text())
    assert sorted(q["node_id"] for q in result["quanta"]) == sorted(ids)


def test_a_ctrl_bps_run_on_the_local_backend(cli: Any, rubin: dict[str, Any]) -> None:
    _check_end_to_end(cli, rubin, {"computeSite": "local", "site": {"local": {"cores": 2}}})


def test_a_ctrl_bps_run_on_slurm(cli: Any, rubin: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    use_slurm(monkeypatch)
    _check_end_to_end(cli, rubin, {"computeSite": "slurm",
                                   "site": {"slurm": {"wmsServiceClass": "slurm", "pollInterval": 0.2}}})


def test_without_qgraph_file_pipetask_qgraph_builds_it(rubin: dict[str, Any], tmp_path: Path) -> None:
    from batchprod.engine.prepare import prepare

    cfg = {"pipelineYaml": str(rubin["root"] / "pipeline.yaml"),
           "payload": {"payloadName": "q", "butlerConfig": str(rubin["repo"]), "inCollection": "inputs",
                       "dataQuery": "detector IN (0, 2)", "output": "u/test/q", "outputRun": "u/test/q/r"},
           "submitPath": str(tmp_path / "submit" / "{outputRun}")}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    run = prepare(tmp_path / "q.yaml")
    assert run.qgraph.counts() == {"a": 2, "b": 2, "c": 1} and run.qgraph.metadata["output_run"] == "u/test/q/r"
    assert (run.submit_dir / "rubin.qg").is_file() and "rubin.qg" in run.workflow.group(1).command
    # a query pipetask refuses: one line naming the key and pipetask's own words; nothing written
    cfg["payload"].update(dataQuery="detectr = 1", outputRun="u/test/q/r2")
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"key 'createQuantumGraph': building the quantum graph \(pipetask qgraph\) "
                                          r"failed \(exit 1\): .*detectr"):
        prepare(tmp_path / "q.yaml")
    assert sorted(p.name for p in (tmp_path / "submit" / "u" / "test" / "q").iterdir()) == ["r"]


def test_without_user_pipetask_qgraph_and_the_submit_dir_name_one_operator(
        rubin: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$USER unset (a batch environment): ctrl_bps's default output u/{operator}/... is the login name
    in pipetask qgraph's command as in the submit directory's name (never ${USER} left to the job's
    shell, set -u); a prepare that fails leaves none of the directories it made."""
    import pwd

    from batchprod.engine.prepare import prepare

    try:
        login = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        pytest.skip("no password entry for this uid")
    for var in ("USER", "LOGNAME", "LNAME", "USERNAME"):  # the login name from the password database
        monkeypatch.delenv(var, raising=False)
    cfg = {"pipelineYaml": str(rubin["root"] / "pipeline.yaml"),
           "payload": {"payloadName": "s1", "butlerConfig": str(rubin["repo"]), "inCollection": "inputs",
                       "dataQuery": "detector IN (0, 2)"},
           "submitPath": str(tmp_path / "sub" / "{outputRun}")}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    run = prepare(tmp_path / "q.yaml")
    output_run = run.qgraph.metadata["output_run"]
    assert output_run.startswith(f"u/{login}/s1/") and run.qgraph.counts() == {"a": 2, "b": 2, "c": 1}
    assert run.submit_dir == (tmp_path / "sub" / output_run).resolve()
    assert yaml.safe_load((run.submit_dir / "config.yaml").read_text())["operator"] == login  # frozen
    cfg["payload"]["dataQuery"] = "detectr = 1"
    cfg["submitPath"] = str(tmp_path / "sub2" / "{outputRun}")
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"key 'createQuantumGraph': building the quantum graph .*detectr"):
        prepare(tmp_path / "q.yaml")
    assert not (tmp_path / "sub2").exists()


def test_a_graph_for_another_output_run_is_moved_to_the_configs(rubin: dict[str, Any], tmp_path: Path) -> None:
    from batchprod.engine.prepare import prepare

    path = _submit_file(rubin, {"submitPath": str(tmp_path / "{outputRun}")})
    data = yaml.safe_load(path.read_text())
    data["payload"]["outputRun"] = "u/test/out/other"
    path.write_text(yaml.safe_dump(data))
    run = prepare(path)  # pipetask update-graph-run, as ctrl_bps does
    assert run.qgraph.metadata["output_run"] == "u/test/out/other"
    from batchprod.graph.rubin import read_rubin_qgraph

    assert read_rubin_qgraph(run.submit_dir / "rubin.qg").metadata["output_run"] == "u/test/out/other"


def test_keys_without_effect_are_said_and_extend_run_is_refused(rubin: dict[str, Any], tmp_path: Path) -> None:
    from batchprod.engine.prepare import prepare

    path = _submit_file(rubin, {"submitPath": str(tmp_path / "{outputRun}"), "saveDot": True})
    with pytest.raises(ConfigError, match=r"--extend-run is for batchprod repositories; a Butler's output run"):
        prepare(path, existing="extend")
    assert not (tmp_path / "u").exists()
    run = prepare(path)
    assert run.notes == ["ctrl_bps keys with no effect here (batchprod names its own files): saveDot"]


def test_the_default_final_job_fits_a_small_site_and_follows_restart_overrides(rubin: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    from batchprod.engine.prepare import prepare
    from batchprod.workflow.overrides import apply_overrides

    path = _submit_file(rubin, {"submitPath": str(tmp_path / "{outputRun}"), "computeSite": "local",
                                "site": {"local": {"cores": 2, "memory": "8GB"}}})
    data = yaml.safe_load(path.read_text())
    del data["finalJob"]["requestCpus"], data["finalJob"]["requestMemory"]  # ctrl_bps's 16 cores, 32 GB
    path.write_text(yaml.safe_dump(data))
    run = prepare(path)
    res = run.workflow.final.resources
    assert (res.request_cpus, res.request_memory) == (2, 8192)
    assert any("finalJob: ctrl_bps's default resources do not fit site 'local' (cpus 16 -> 2, memory 32,768 -> "
               "8,192)" in n for n in run.notes), run.notes
    assert " -j 2 " in run.workflow.final_spec()["final"]["command"]
    apply_overrides(run.workflow, {"finalJob.requestCpus": 1})  # what restart -o finalJob.requestCpus=1 does
    assert " -j 1 " in run.workflow.final_spec()["final"]["command"]
    # a value the file sets itself is kept, and checked against the site
    data["finalJob"]["requestCpus"] = 4
    data["submitPath"] = str(tmp_path / "b" / "{outputRun}")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="requestCpus 4 exceeds site 'local' cores 2"):
        prepare(path)


def test_jobs_run_under_the_wrapper_as_an_htcondor_export_runs_them(rubin: dict[str, Any], tmp_path: Path) -> None:
    import subprocess
    import sys

    from batchprod.engine.prepare import prepare
    from batchprod.wms.htcondor import export_dag

    r = {**rubin}
    (r["switch"]).unlink()
    run = prepare(_submit_file(r, {"submitPath": str(tmp_path / "{outputRun}")}))
    dag = export_dag(run)
    assert "pipetaskInit" in dag.read_text()
    for j in (0, 1):  # pipetaskInit, then ab_detector0: as a node runs them
        p = subprocess.run([sys.executable, "-m", "batchprod.execution.runner", "--submit-dir", str(run.submit_dir),
                            "--job-index", str(j), "--attempt", "1"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    name = run.workflow.job_name(1)
    result = json.loads((run.submit_dir / "logs" / "ab" / f"{name}.1.result.json").read_text())
    assert {o["dataset_type"] for o in result["outputs"]} >= {"a_out", "b_out"}


def test_a_ctrl_bps_run_on_a_parsl_site(cli: Any, rubin: dict[str, Any]) -> None:
    try:
        import parsl  # noqa: F401
    except ImportError:
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail("parsl is required here (BATCHPROD_REQUIRE_ENGINES=1)")
        pytest.skip("parsl not installed")
    # the ctrl_bps_parsl way of saying it: ParslService and a sites.Local site of 2 cores
    _check_end_to_end(cli, rubin, {"wmsServiceClass": "lsst.ctrl.bps.parsl.ParslService", "computeSite": "local",
                                   "site": {"local": {"class": "lsst.ctrl.bps.parsl.sites.Local", "cores": 2}}})
