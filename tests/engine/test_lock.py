"""One engine per run, ever: racing restarts, detaches and _execute never drive one run twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from batchprod.engine import lock
from batchprod.engine.prepare import prepare
from batchprod.state.run import Run
from batchprod.testing import command_task, write_submit

BP = [sys.executable, "-m", "batchprod.cli"]


def _slow_run(tmp_path: Path, toy_repo: Path, log: Path) -> Run:
    # every execution of a quantum appends a line: a job run twice shows up twice
    cmd = f"echo {{label}}-{{visit}}-{{detector}} >> {log}; sleep 0.3; cp {{inputs.raw}} {{outputs.calexp}}"
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)}}
    return prepare(write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 2}}))


def _race(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _executions(log: Path) -> list[str]:
    return log.read_text().split()


def test_two_restarts_in_the_same_second_one_drives(tmp_path: Path, toy_repo: Path) -> None:
    log = tmp_path / "executions.log"
    run = _slow_run(tmp_path, toy_repo, log)
    a, b = _race([*BP, "restart", str(run.submit_dir)], [*BP, "restart", str(run.submit_dir)])
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.stderr, b.stderr)
    loser = a if a.returncode == 2 else b
    line = loser.stderr.strip()
    assert "\n" not in line and "is being driven by pid" in line and "on host" in line and "Traceback" not in line
    runs = _executions(log)
    assert len(runs) == len(set(runs)) == run.store.run_info()["n_jobs"]  # each job ran exactly once
    assert all(j["attempts"] == 1 for j in run.store.jobs())


def test_restart_and_execute_race(tmp_path: Path, toy_repo: Path) -> None:
    log = tmp_path / "executions.log"
    run = _slow_run(tmp_path, toy_repo, log)
    a, b = _race([*BP, "_execute", str(run.submit_dir)], [*BP, "restart", str(run.submit_dir)])
    assert sorted([a.returncode, b.returncode]) == [0, 2], (a.stderr, b.stderr)
    runs = _executions(log)
    assert len(runs) == len(set(runs))


def test_two_detached_restarts_one_is_refused_at_once(tmp_path: Path, toy_repo: Path) -> None:
    log = tmp_path / "executions.log"
    run = _slow_run(tmp_path, toy_repo, log)
    a, b = _race([*BP, "restart", "--detach", str(run.submit_dir)],
                 [*BP, "restart", "--detach", str(run.submit_dir)])
    assert sorted([a.returncode, b.returncode]) == [0, 2], (a.stderr, b.stderr)
    winner = a if a.returncode == 0 else b
    assert "detached" in winner.stdout
    # the detached engine holds the lock until it is done
    import time

    deadline = time.monotonic() + 60
    while not lock.is_free(run.submit_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.store.run_info()["status"] == "SUCCEEDED"
    runs = _executions(log)
    assert len(runs) == len(set(runs)) == run.store.run_info()["n_jobs"]


def test_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """kill -9 of the holder frees the run: no stale lock file to clean by hand."""
    code = f"from batchprod.engine import lock; lock.acquire({str(tmp_path)!r}); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        deadline = time.monotonic() + 20
        while lock.holder_pid(tmp_path) != p.pid and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not lock.is_free(tmp_path)
    finally:
        p.kill()
        p.wait()
    assert lock.is_free(tmp_path)
    fd = lock.acquire(tmp_path)
    assert lock.holder_pid(tmp_path) == os.getpid()
    lock.release(tmp_path)
    assert fd >= 0


def test_cancel_of_a_finished_run_changes_nothing(tmp_path: Path, toy_repo: Path, cli) -> None:
    run = prepare(write_submit(tmp_path, repo=toy_repo))
    assert cli("restart", run.submit_dir).exit_code == 0
    before = run.store.jobs()
    r = cli("cancel", run.submit_dir)
    assert r.exit_code == 0
    assert "nothing to cancel" in r.output and "SUCCEEDED" in r.output
    assert run.store.run_info()["status"] == "SUCCEEDED"
    assert run.store.jobs() == before
