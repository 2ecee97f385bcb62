"""HTCondor DAGMan export: validated with the htcondor2/classad2 bindings, not run (no daemons here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchprod.state.run import Run
from batchprod.testing import make_toy_repo, write_submit

htcondor2 = pytest.importorskip("htcondor2")
classad2 = pytest.importorskip("classad2")


@pytest.fixture
def exported(tmp_path: Path, cli) -> tuple[Run, Path]:
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2), detectors=(0, 1))
    cfg = write_submit(tmp_path, repo=repo, numberOfRetries=2, requestMemory=1000, memoryMultiplier=2,
                       memoryLimit=3000, requestWalltime="00:10:00", site={"local": {"maxJobs": "{mj}"}},
                       variables={"mj": 50},  # the site's typed settings, substituted
                       pipetask={"coadd": {"priority": 5, "requestCpus": 2}},
                       finalJob={"command": "echo done"})
    r = cli("prepare", cfg, "--wms", "htcondor")
    assert r.exit_code == 0, r.output
    run = Run(tmp_path / "submit" / "toy" / "run")
    return run, run.submit_dir / "htcondor" / "run.dag"


def test_submit_files_parse_and_memory_grows(exported) -> None:
    run, dag = exported
    subs = sorted(dag.parent.glob("*.sub"))
    assert [p.name for p in subs] == ["calibrate.sub", "coadd.sub", "finalJob.sub"]  # one per group, not per job
    for p in subs:
        sub = htcondor2.Submit(p.read_text())
        for key in ("request_memory", "periodic_release", "periodic_remove", "on_exit_hold"):
            classad2.ExprTree(sub[key])  # every expression is valid ClassAd syntax
        assert sub["allowed_execute_duration"] == "600"
    coadd = htcondor2.Submit((dag.parent / "coadd.sub").read_text())
    assert coadd["request_cpus"] == "2"
    ad = classad2.ClassAd()
    ad["RequestMemory"] = classad2.ExprTree(coadd["request_memory"])
    grown = []
    for starts in range(4):
        ad["NumJobStarts"] = starts
        grown.append(ad.eval("RequestMemory"))
    assert grown == [1000, 2000, 3000, 3000]  # x2 per start, capped by memoryLimit
    # held for OOM: released while starts remain and memory is under the cap, removed otherwise
    ad["JobStatus"] = 5
    ad["HoldReasonCode"] = 34
    ad["HoldReasonSubCode"] = 0
    ad["periodic_release"] = classad2.ExprTree(coadd["periodic_release"])
    ad["periodic_remove"] = classad2.ExprTree(coadd["periodic_remove"])
    ad["NumJobStarts"] = 1
    assert ad.eval("periodic_release") is True and ad.eval("periodic_remove") is False
    ad["NumJobStarts"] = 3
    assert ad.eval("periodic_release") is False and ad.eval("periodic_remove") is True


def test_dag_structure_matches_the_workflow(exported) -> None:
    run, dag = exported
    wf = run.workflow
    lines = dag.read_text().splitlines()
    jobs = {ln.split()[1]: ln.split()[2] for ln in lines if ln.startswith("JOB ")}
    names = wf.job_names()
    assert set(jobs) == set(names)
    assert all(Path(p).is_file() for p in jobs.values())
    edges = set()
    for ln in lines:
        if ln.startswith("PARENT "):
            parent, children = ln[len("PARENT "):].split(" CHILD ")
            edges.update((parent, c) for c in children.split())
    expected = {(names[int(p)], names[j]) for j in range(len(wf)) for p in wf.parents(j)}
    assert edges == expected
    retries = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("RETRY ")}
    assert retries == dict.fromkeys(names, 2)
    prio = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("PRIORITY ")}
    assert prio == {n: 5 for n in names if n.startswith("coadd")}
    assert {ln for ln in lines if ln.startswith("MAXJOBS")} == {"MAXJOBS calibrate 50", "MAXJOBS coadd 50"}
    assert any(re.match(r"FINAL finalJob .*/finalJob\.sub$", ln) for ln in lines)
    vars_ = [ln for ln in lines if ln.startswith("VARS ")]
    assert len(vars_) == len(names) + 1


def test_the_node_command_runs_the_job(exported) -> None:
    """What a node runs (the submit file's executable + arguments) really executes the job."""
    run, dag = exported
    sub = htcondor2.Submit((dag.parent / "calibrate.sub").read_text())
    args = sub["arguments"].strip('"').replace("$(jobIndex)", "0").replace("$(Cluster)", "42").split()
    p = subprocess.run([sub["executable"], *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = Path(run.workflow.run["repo"]) / "toy" / "run" / "calexp" / "calexp_visit1_detector0.fits"
    assert out.read_text().startswith("raw visit=1 detector=0")
    assert (run.log_dir / "calibrate" / "calibrate_visit1_detector0.42.result.json").is_file()
    assert sys.executable == sub["executable"]
