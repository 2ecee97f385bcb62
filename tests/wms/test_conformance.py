"""One suite, every backend: the same behaviour on local processes and on a real Slurm cluster."""

from __future__ import annotations

import json
from pathlib import Path

from batchprod.engine.control import execute as engine_execute
from batchprod.engine.prepare import prepare
from batchprod.state.run import Run
from batchprod.testing import command_task, make_toy_repo, start_orchestrator, wait_for, write_submit
from batchprod.wms.registry import get_wms


def submit(tmp_path: Path, backend, pipeline: dict, repo: Path | None = None, **keys) -> Run:
    repo = repo or make_toy_repo(tmp_path / "repo")
    return prepare(write_submit(tmp_path, pipeline, repo=repo, **{**backend.keys, **keys}))


def execute(run: Run) -> str:
    return engine_execute(get_wms(run.wms_name()), run)


def states(run: Run) -> dict[str, str]:
    return {j["name"]: j["status"] for j in run.store.jobs()}


def cal(cmd: str) -> dict:
    return {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)}}


TWO_STEP_FAIL = {"tasks": {
    "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                              "test {detector} != 1 || {{ echo 'ValueError: bad detector' >&2; exit 3; }}; "
                              "cp {inputs.raw} {outputs.calexp}"),
    "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
}}


def test_success_and_report(tmp_path: Path, backend, cli) -> None:
    run = submit(tmp_path, backend, None, finalJob={"command": "echo merged"})
    assert run.wms_name() == backend.name
    assert execute(run) == "SUCCEEDED"
    assert set(states(run).values()) == {"SUCCEEDED"}
    assert len(run.store.outputs()) == 6
    rep = json.loads(cli("report", run.submit_dir, "--json").output)
    assert rep["wms"] == backend.name and rep["jobs"]["succeeded"] == 7
    # provenance: where every attempt ran and in which (recorded) context
    atts = run.store.attempts()
    assert all(a["host"] and a["context"] for a in atts)
    assert set(run.store.contexts(a["context"] for a in atts)) == {a["context"] for a in atts}


def test_payload_failure_downstream_unready_and_retry(tmp_path: Path, backend, cli) -> None:
    backend.runs_payloads()
    run = submit(tmp_path, backend, TWO_STEP_FAIL, numberOfRetries=1)
    assert execute(run) == "FAILED"
    st = states(run)
    assert st["calibrate_visit1_detector1"] == "FAILED" and st["coadd_tract0_patch1"] == "UNREADY"
    assert st["coadd_tract0_patch0"] == "SUCCEEDED"
    job = run.store.job_by_name("calibrate_visit2_detector1")
    assert job["attempts"] == 2 and job["failure_class"] == "user_error" and job["exit_code"] == 3
    f = json.loads(cli("report", run.submit_dir, "--failures", "--json").output)
    assert f["failed"] == 2 and f["groups"][0]["cause"] == "ValueError: bad detector"


def test_oom_retries_with_more_memory(tmp_path: Path, backend) -> None:
    backend.runs_payloads()
    task = {"python": "batchprod.testing:alloc_task", "dimensions": ["visit", "detector"], "inputs": ["raw"],
            "outputs": ["calexp"], "config": {"mb": 300, "hold": 1.5}}
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,))
    run = submit(tmp_path, backend, {"tasks": {"calibrate": task}}, repo=repo, requestMemory=150,
                 memoryMultiplier=3, numberOfRetries=1)
    assert execute(run) == "SUCCEEDED"
    atts = run.store.attempts(0)
    assert [(a["failure_class"], a["request_memory"]) for a in atts] == [("oom", 150), (None, 450)]
    ctx = run.store.contexts([atts[-1]["context"]])[atts[-1]["context"]]  # the wrapper's, on a batch node
    assert ctx["packages"]["batchprod"] and ctx["host"] == atts[-1]["host"]


def test_walltime(tmp_path: Path, backend) -> None:
    backend.runs_payloads()
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,))
    run = submit(tmp_path, backend, cal("sleep 60"), repo=repo, requestWalltime=2)
    assert execute(run) == "FAILED"
    (a,) = run.store.attempts(0)
    assert a["failure_class"] == "timeout" and a["wall_s"] < 30


def test_kill_from_outside_keeps_the_budget(tmp_path: Path, backend) -> None:
    backend.runs_payloads()
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,))
    run = submit(tmp_path, backend, cal('test "$BATCHPROD_ATTEMPT" != 1 || sleep 60; cp {inputs.raw} {outputs.calexp}'),
                 repo=repo, numberOfRetries=0)
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: any(a["status"] == "RUNNING" and a["handle"] for a in run.store.attempts(0)), timeout=60)
    wait_for(lambda: Path(run.store.attempts(0)[0]["stdout"]).exists() and
             "quantum" in Path(run.store.attempts(0)[0]["stdout"]).read_text(), timeout=60)
    backend.kill_from_outside(run.store.attempts(0)[0])
    assert orch.wait(90) == 0
    atts = run.store.attempts(0)
    assert [(a["status"], a["failure_class"]) for a in atts] == [("FAILED", "killed"), ("SUCCEEDED", None)]
    assert run.store.jobs()[0]["retries"] == 0


def test_cancel_then_restart(tmp_path: Path, backend, cli) -> None:
    backend.runs_payloads()
    go = tmp_path / "go"
    run = submit(tmp_path, backend, cal(f"test -e {go} || sleep 60; cp {{inputs.raw}} {{outputs.calexp}}"))
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: len(run.store.attempts(status="RUNNING")) >= 1, timeout=60)
    assert cli("cancel", run.submit_dir).exit_code == 0
    orch.wait(60)
    assert run.store.run_info()["status"] == "CANCELLED"
    assert set(states(run).values()) == {"CANCELLED"}
    go.touch()
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 0, r.output
    assert set(states(run).values()) == {"SUCCEEDED"}
