"""Restart: never redo finished work, keep what jobs learned, survive kill -9 at any moment.

Every test runs twice: on each run's own SQLite file, and on a central PostgreSQL database (a fresh
schema per test, selected with $BATCHPROD_DB as ``--db`` would)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.state.run import Run
from batchprod.state.testdb import use_db
from batchprod.testing import (
    chaos_trial,
    command_task,
    make_toy_repo,
    reference_outputs,
    start_orchestrator,
    wait_for,
    write_submit,
)


@pytest.fixture(params=["sqlite", "postgresql"], autouse=True)
def db(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    yield from use_db(request.param, monkeypatch)


def test_restart_reruns_only_what_did_not_succeed(tmp_path: Path, toy_repo: Path, cli) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    pipeline = {"tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                  f"test {{detector}} != 1 || test ! -e {flag} || exit 3; cp {{inputs.raw}} {{outputs.calexp}}"),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, numberOfRetries=1))
    assert LocalExecutor(run).execute() == "FAILED"
    before = {j["name"]: j for j in run.store.jobs()}
    assert before["coadd_tract0_patch1"]["status"] == "UNREADY"
    flag.unlink()  # the operator fixed the problem
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 0, r.output
    after = {j["name"]: j for j in run.store.jobs()}
    assert all(j["status"] == "SUCCEEDED" for j in after.values())
    for name, j in before.items():
        if j["status"] == "SUCCEEDED":
            assert after[name]["attempts"] == j["attempts"] == 1  # never re-run
    assert after["calibrate_visit1_detector1"]["attempts"] == 3  # 2 failed + 1 after restart
    assert after["calibrate_visit1_detector1"]["retries"] == 0  # fresh budget
    assert after["coadd_tract0_patch1"]["attempts"] == 1
    assert cli("restart", run.submit_dir).exit_code == 0  # nothing left to do: no-op


def test_learned_memory_survives_restart(tmp_path: Path, cli) -> None:
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,))
    task = {"python": "batchprod.testing:alloc_task", "dimensions": ["visit", "detector"], "inputs": ["raw"],
            "outputs": ["calexp"], "config": {"mb": 400, "hold": 1.0}}
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, requestMemory=150,
                               memoryMultiplier=2, numberOfRetries=1))
    assert LocalExecutor(run).execute() == "FAILED"
    assert run.store.jobs()[0]["request_memory"] == 600
    assert cli("restart", run.submit_dir).exit_code == 0
    assert [a["request_memory"] for a in run.store.attempts(0)] == [150, 300, 600]


def test_restart_refused_while_running_and_cancelled_run_restarts(tmp_path: Path, toy_repo: Path, cli) -> None:
    go = tmp_path / "go"
    pipeline = {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"], f"test -e {go} || sleep 60; cp {{inputs.raw}} {{outputs.calexp}}")}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 1}}))
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: run.store.attempts(status="RUNNING"))
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 2 and "is being driven by pid" in r.output
    assert cli("cancel", run.submit_dir).exit_code == 0
    orch.wait(10)
    r = cli("report", run.submit_dir, "--json")
    assert r.exit_code == 1 and '"cancelled": 4' in r.output
    go.touch()
    assert cli("restart", run.submit_dir).exit_code == 0
    assert {j["status"] for j in run.store.jobs()} == {"SUCCEEDED"}
    assert run.store.attempts(0)[0]["status"] == "CANCELLED"


@pytest.mark.parametrize("payload", ["command", "python"])
def test_restart_after_orchestrator_sigkill_adopts_finished_work(tmp_path: Path, toy_repo: Path, payload: str) -> None:
    import os
    import signal

    if payload == "command":  # run inline: the orchestrator does post-job, so restart must finish it
        task = command_task(["visit", "detector"], ["raw"], ["calexp"], "sleep 1; cp {inputs.raw} {outputs.calexp}")
        done = "*.result.json.exit"
    else:  # the Python wrapper commits on its own
        task = {"python": "batchprod.testing:alloc_task", "dimensions": ["visit", "detector"], "inputs": ["raw"],
                "outputs": ["calexp"], "config": {"mb": 1, "hold": 1.0}}
        done = "*.result.json"
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=toy_repo, site={"local": {"cores": 4}}))
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: len(run.store.attempts(status="RUNNING")) == 4)
    os.kill(orch.pid, signal.SIGKILL)  # the jobs go on as orphans and finish
    orch.wait()
    wait_for(lambda: len(list(run.log_dir.rglob(done))) == 4, timeout=20)
    assert LocalExecutor(Run(run.submit_dir)).execute() == "SUCCEEDED"
    atts = run.store.attempts()
    assert len(atts) == 4 and all(a["status"] == "SUCCEEDED" for a in atts)
    assert all("adopted" in (a["message"] or "") for a in atts)
    assert len(run.store.outputs()) == 4
    assert all(Path(o["path"]).is_file() for o in run.store.outputs())


def test_crash_safety_random_kills(tmp_path: Path) -> None:
    ref = reference_outputs(tmp_path / "ref")
    assert len(ref) == 9 + 3 + 1
    for seed in range(3):
        res = chaos_trial(tmp_path / f"t{seed}", ref, seed=seed, kills=3, max_delay=1.5)
        assert (res["lost"], res["duplicated"], res["inconsistent"]) == (0, 0, 0), res


def test_restart_with_overrides_changes_job_values_and_records_them(tmp_path: Path, toy_repo: Path, cli) -> None:
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                    "sleep 1.5; cp {inputs.raw} {outputs.calexp}")}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, requestWalltime=1, numberOfRetries=0,
                               payload={"dataQuery": "visit = 1 AND detector = 0"}))
    assert cli("restart", run.submit_dir).exit_code == 1
    assert run.store.jobs()[0]["failure_class"] == "timeout"
    bad = cli("restart", run.submit_dir, "-o", "pipelineYaml=x.yaml")
    assert bad.exit_code == 2 and "restart can change job values only" in bad.output
    bad = cli("restart", run.submit_dir, "-o", "pipetask.nosuch.requestWalltime=10")
    assert bad.exit_code == 2 and "no such scope 'pipetask.nosuch'" in bad.output
    r = cli("restart", run.submit_dir, "-o", "pipetask.calibrate.requestWalltime=00:00:30", "-o", "requestMemory=300")
    assert r.exit_code == 0, r.output
    assert "changed from now on: pipetask.calibrate.requestWalltime=30" in r.output
    history = (run.submit_dir / "history.log").read_text()
    assert "restart -o pipetask.calibrate.requestWalltime=30 -o requestMemory=300" in history
    a = run.store.attempts(0)
    assert [x["request_memory"] for x in a] == [100, 300]
    assert Run(run.submit_dir).workflow.groups[0].resources.request_walltime == 30  # applies from now on
