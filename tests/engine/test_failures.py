"""Real processes that fail in every way the wrapper must tell apart, and how each is retried."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.state.run import Run
from batchprod.testing import command_task, make_toy_repo, start_orchestrator, wait_for, write_submit

ONE = {"visits": (1,), "detectors": (0,)}


def py_task(fn: str, **config) -> dict:
    return {"python": f"batchprod.testing:{fn}", "dimensions": ["visit", "detector"], "inputs": ["raw"],
            "outputs": ["calexp"], "config": config}


def one_job(tmp_path: Path, task: dict, **keys) -> Run:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, **keys))
    LocalExecutor(run).execute()
    return run


def attempts(run: Run) -> list[dict]:
    return run.store.attempts(0)


def test_nonzero_exit_is_user_error_with_its_cause(tmp_path: Path) -> None:
    run = one_job(tmp_path, py_task("chained_error_task"), numberOfRetries=1)
    a = attempts(run)
    assert [x["failure_class"] for x in a] == ["user_error", "user_error"]
    assert a[-1]["exit_code"] == 1
    assert a[-1]["error_line"] == "KeyError: 'calib_dir'"  # the cause, not the RuntimeError symptom
    assert run.store.jobs()[0]["status"] == "FAILED"


def test_crash_by_signal_is_user_error(tmp_path: Path) -> None:
    run = one_job(tmp_path, py_task("abort_task"))
    (a,) = attempts(run)
    assert a["failure_class"] == "user_error" and a["signal"] == signal.SIGABRT


def test_memory_error_is_oom_and_retried_with_more_memory(tmp_path: Path) -> None:
    run = one_job(tmp_path, py_task("memory_error_task"), requestMemory=100, numberOfRetries=1, memoryMultiplier=2)
    assert [(x["failure_class"], x["request_memory"]) for x in attempts(run)] == [("oom", 100), ("oom", 200)]


def test_going_over_the_memory_request_is_killed_as_oom_and_retried_bigger(tmp_path: Path) -> None:
    run = one_job(tmp_path, py_task("alloc_task", mb=300, hold=1.0), requestMemory=150, memoryMultiplier=2.5,
                  numberOfRetries=2)
    a = attempts(run)
    assert [(x["status"], x["failure_class"], x["request_memory"]) for x in a] == [
        ("FAILED", "oom", 150), ("SUCCEEDED", None, 375)]
    assert a[0]["peak_rss_mb"] > 150 and a[0]["signal"] == signal.SIGKILL
    assert a[0]["cpu_s"] is not None and a[0]["cpu_s"] > 0  # an OOM-killed attempt still reports its CPU
    assert "process tree used" in a[0]["message"]
    assert a[1]["peak_rss_mb"] > 300
    job = run.store.jobs()[0]
    assert job["status"] == "SUCCEEDED" and job["request_memory"] == 375


def test_a_shell_jobs_payload_killed_over_its_memory_reports_the_cpu_it_used(tmp_path: Path) -> None:
    """The payload is the shell's child: killed with the tree before the shell reaps it, its CPU is
    in no rusage we get, only in the samples taken while it ran."""
    burn = tmp_path / "burn.py"
    burn.write_text("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\n"
                    "x = bytearray(300 * 2**20)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\ntime.sleep(5)\n")
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], f"python3 {burn}; touch {{outputs.calexp}}")
    run = one_job(tmp_path, task, requestMemory=100, numberOfRetries=0)
    (a,) = attempts(run)
    assert a["failure_class"] == "oom" and a["peak_rss_mb"] > 100
    assert a["cpu_s"] >= 0.8, a["cpu_s"]


def test_oom_at_the_cap_fails_for_good_with_a_clear_reason(tmp_path: Path) -> None:
    run = one_job(tmp_path, py_task("alloc_task", mb=300, hold=1.0), requestMemory=150, memoryMultiplier=2,
                  memoryLimit=200, numberOfRetries=5)
    a = attempts(run)
    assert [x["request_memory"] for x in a] == [150, 200]
    job = run.store.jobs()[0]
    assert job["status"] == "FAILED" and "at memory cap 200 MB" in job["message"]


def test_walltime(tmp_path: Path) -> None:
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], "sleep 30")
    run = one_job(tmp_path, task, requestWalltime=1)
    (a,) = attempts(run)
    assert a["failure_class"] == "timeout" and a["wall_s"] < 10
    assert "requestWalltime 1s" in run.store.jobs()[0]["message"]


def test_stage_out_failure_is_infrastructure_and_backs_off(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"])
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, numberOfRetries=0,
                               infraRetryDelay=0.3, maxInfraRetries=2))
    blocker = repo / "toy" / "run" / "calexp" / "calexp_visit1_detector0.fits"
    blocker.mkdir(parents=True)  # the final location cannot take a file: publishing fails
    LocalExecutor(run).execute()
    a = attempts(run)
    assert [x["failure_class"] for x in a] == ["infrastructure"] * 3
    assert "stage-out: cannot publish" in a[0]["error_line"]
    gaps = [a[i + 1]["start"] - a[i]["end"] for i in range(2)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6  # exponential back-off
    assert blocker.is_dir()  # nothing half-written where consumers read


def test_stage_out_recovers_when_the_service_comes_back(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"])
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, infraRetryDelay=1.0))
    blocker = repo / "toy" / "run" / "calexp" / "calexp_visit1_detector0.fits"
    blocker.mkdir(parents=True)
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: any(x["failure_class"] == "infrastructure" for x in attempts(run)))
    blocker.rmdir()  # the storage is back
    assert orch.wait(30) == 0
    assert [x["status"] for x in attempts(run)] == ["FAILED", "SUCCEEDED"]
    assert run.store.jobs()[0]["retries"] == 0  # no retry budget spent on the outage
    assert blocker.read_text().startswith("raw visit=1")


def test_stage_in_failure_is_infrastructure(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    (repo / "raw" / "raw_1_0.txt").unlink()
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"])}},
                               repo=repo, maxInfraRetries=0))
    LocalExecutor(run).execute()
    (a,) = attempts(run)
    assert a["failure_class"] == "infrastructure" and "stage-in" in a["error_line"]


def _kill_running_attempt(run: Run, number: int) -> None:
    wait_for(lambda: any(x["status"] == "RUNNING" and x["number"] == number and x["pid"] for x in attempts(run)))
    pid = next(x["pid"] for x in attempts(run) if x["number"] == number)
    os.killpg(pid, signal.SIGKILL)


def test_kill_from_outside_does_not_spend_the_budget(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    slow_first = command_task(["visit", "detector"], ["raw"], ["calexp"],
                              'if [ "$BATCHPROD_ATTEMPT" = 1 ]; then echo partial > {outputs.calexp}; sleep 60; fi; '
                              "cp {inputs.raw} {outputs.calexp}")
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": slow_first}}, repo=repo, numberOfRetries=0))
    orch = start_orchestrator(run.submit_dir)
    _kill_running_attempt(run, 1)
    assert orch.wait(30) == 0
    a = attempts(run)
    assert [(x["status"], x["failure_class"]) for x in a] == [("FAILED", "killed"), ("SUCCEEDED", None)]
    job = run.store.jobs()[0]
    assert job["retries"] == 0 and job["preemptions"] == 1
    # the killed attempt's partial output never reached the published location
    out = repo / "toy" / "run" / "calexp" / "calexp_visit1_detector0.fits"
    assert out.read_text().startswith("raw visit=1")


def test_preemptions_are_bounded(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], "sleep 60")
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, maxPreemptions=1))
    orch = start_orchestrator(run.submit_dir)
    _kill_running_attempt(run, 1)
    _kill_running_attempt(run, 2)
    assert orch.wait(30) == 1
    job = run.store.jobs()[0]
    assert job["status"] == "FAILED" and "maxPreemptions=1" in job["message"]


def test_killed_attempt_leaves_no_half_written_output(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", **ONE)
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], "echo half > {outputs.calexp}; sleep 60")
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": task}}, repo=repo, maxPreemptions=0))
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: list((repo / "toy" / "run" / "_staging").rglob("*.fits")))  # mid-write
    _kill_running_attempt(run, 1)
    assert orch.wait(30) == 1
    assert not (repo / "toy" / "run" / "calexp").exists()
    staged = list((repo / "toy" / "run" / "_staging").rglob("*.fits"))
    assert [p.read_text() for p in staged] == ["half\n"]  # it only ever existed in its attempt's staging


@pytest.mark.parametrize("cls", ["user_error", "oom"])
def test_failures_report_groups_by_signature(tmp_path: Path, cli, cls: str) -> None:
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2, 3), detectors=(0, 1))
    fn = "chained_error_task" if cls == "user_error" else "memory_error_task"
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": py_task(fn)}}, repo=repo))
    LocalExecutor(run).execute()
    r = cli("report", run.submit_dir, "--failures", "--json")
    assert r.exit_code == 1
    import json

    data = json.loads(r.output)
    assert data["failed"] == 6 and len(data["groups"]) == 1
    g = data["groups"][0]
    assert g["count"] == 6 and g["failure_class"] == cls and len(g["examples"]) == 3
    j = data["jobs"][0]
    assert j["data_id"] == {"visit": 1, "detector": 0} and j["stderr_tail"]
    text = cli("report", run.submit_dir, "--failures").output
    assert "6 failed jobs in 1 failure signature " in text
    hist = json.loads(cli("report", run.submit_dir, "--job", "calibrate_visit2_detector1", "--json").output)
    assert hist["attempts_detail"][0]["stderr"].endswith("calibrate_visit2_detector1.1.err")


@pytest.mark.parametrize("raw", [False, True], ids=["sqlalchemy", "sqlite3"])
def test_disk_full_under_the_engine_stops_cleanly_and_restart_finishes(tmp_path: Path, toy_repo: Path, cli,
                                                                       monkeypatch, raw: bool) -> None:
    """SQLite says 'database or disk is full' mid-run: one clear line naming the place, jobs stopped, run
    restartable, and no job spends its retry budget on it. Either through SQLAlchemy or from the
    sqlite3 module itself (the store's batched writes use it directly)."""
    import sqlite3

    import sqlalchemy as sa

    from batchprod.state.store import StateStore

    cmd = "sleep 0.2; cp {inputs.raw} {outputs.calexp}"
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"],
                                                                              ["calexp"], cmd)}},
                               repo=toy_repo, numberOfRetries=0))
    real_write = StateStore.write
    calls = {"n": 0}

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            full = sqlite3.OperationalError("database or disk is full")
            raise full if raw else sa.exc.OperationalError("INSERT", {}, full)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(StateStore, "write", full_disk)
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: disk full at ") and str(run.submit_dir) in line and "restart" in line
    assert "Traceback" not in r.output
    monkeypatch.setattr(StateStore, "write", real_write)
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 0, r.output
    jobs = run.store.jobs()
    assert all(j["status"] == "SUCCEEDED" and j["retries"] == 0 for j in jobs)


def test_a_payload_that_cannot_write_for_a_full_disk_is_infrastructure_not_its_fault(tmp_path: Path) -> None:
    """ENOSPC in the payload's own write (its stderr says so): retried later as infrastructure,
    without spending the job's retries."""
    flag = tmp_path / "full"
    flag.touch()
    cmd = (f"if test -e {flag}; then rm {flag}; echo 'cp: error writing out.fits: No space left on device' >&2; "
           "exit 1; fi; cp {inputs.raw} {outputs.calexp}")
    task = command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)
    run = one_job(tmp_path, task, numberOfRetries=0, infraRetryDelay=0)
    a = attempts(run)
    assert [(x["failure_class"], x["status"]) for x in a] == [("infrastructure", "FAILED"), (None, "SUCCEEDED")]
    assert "No space left on device" in a[0]["error_line"] and "could not write" in a[0]["message"]
    job = run.store.jobs()[0]
    assert job["status"] == "SUCCEEDED" and job["retries"] == 0


def test_a_payload_that_kills_itself_does_not_stall_the_rest_of_its_run(tmp_path: Path) -> None:
    """SIGKILL from inside the job is a kill (not the payload's exit code), held against the site; on
    the only site that takes work it degrades the site but never takes it away from the other jobs."""
    import time

    pipeline = {"tasks": {
        "killer": command_task(["visit", "detector"], ["raw"], ["calexp"], "bash -c 'kill -9 $$'"),
        "other": command_task(["visit", "detector"], ["raw"], ["flat"], "cp {inputs.raw} {outputs.flat}")}}
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2, 3), detectors=(0, 1))
    run = prepare(write_submit(tmp_path, pipeline, repo=repo, maxPreemptions=2, numberOfRetries=0,
                               site={"local": {"cores": 2}}, pipetask={"killer": {"priority": 10}}))
    t = time.monotonic()
    LocalExecutor(run).execute()
    assert time.monotonic() - t < 60
    jobs = {j["name"]: j for j in run.store.jobs()}
    assert all(j["status"] == "SUCCEEDED" for n, j in jobs.items() if n.startswith("other"))
    assert all(j["status"] == "FAILED" for n, j in jobs.items() if n.startswith("killer"))
