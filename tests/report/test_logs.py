"""An attempt's logs: found by job name and attempt, kept inside the run, followed while it runs."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.errors import RunError
from batchprod.report.logs import attempt_logs, print_logs
from batchprod.state.run import Run
from batchprod.testing import command_task, make_toy_repo, start_orchestrator, wait_for, write_submit

FLAKY = (
    'case "$(echo {dataId})" in '
    '"visit=1 detector=0") if [ "$BATCHPROD_ATTEMPT" = 1 ]; then echo "flaky attempt" >&2; exit 3; fi;; '
    '"visit=2 detector=1") echo "ValueError: bad pixel" >&2; exit 5;; '
    "esac; echo calibrating {visit} {detector}; cat {inputs.raw} > {outputs.calexp}"
)


def flaky_run(tmp_path: Path) -> Run:
    repo = make_toy_repo(tmp_path / "repo")
    pipeline = {"tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], FLAKY),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }}
    run = prepare(write_submit(tmp_path, pipeline, repo=repo, numberOfRetries=1))
    assert LocalExecutor(run).execute() == "FAILED"
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return flaky_run(tmp_path_factory.mktemp("logs"))


def test_latest_attempt_by_default_and_any_attempt_by_number(run: Run) -> None:
    out, err, n = attempt_logs(run, "calibrate_visit2_detector1")
    assert n == 2 and err.name == "calibrate_visit2_detector1.2.err" and out.name.endswith(".2.out")
    assert "ValueError: bad pixel" in err.read_text()
    out, err, n = attempt_logs(run, "calibrate_visit1_detector0", 1)
    assert n == 1 and "flaky attempt" in err.read_text()
    assert "calibrating 1 0" in attempt_logs(run, "calibrate_visit1_detector0")[0].read_text()
    for p in (out, err):
        assert p.is_absolute() and p.is_relative_to(run.submit_dir)


def test_print_logs_headers_and_contents(run: Run) -> None:
    buf = io.StringIO()
    assert print_logs(run, "calibrate_visit2_detector1", out=buf) == "FAILED"
    text = buf.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("==> stdout: ") and "(job calibrate_visit2_detector1 attempt 2, FAILED)" in lines[0]
    err_at = next(i for i, ln in enumerate(lines) if ln.startswith("==> stderr: "))
    assert "ValueError: bad pixel" in "\n".join(lines[err_at:])
    assert "ValueError" not in "\n".join(lines[:err_at])
    assert text.endswith("\n")

    buf = io.StringIO()
    print_logs(run, "calibrate_visit1_detector0", attempt=1, out=buf, stream="stderr")
    assert buf.getvalue().startswith("==> stderr: ") and "stdout" not in buf.getvalue()
    assert "flaky attempt" in buf.getvalue()
    buf = io.StringIO()
    print_logs(run, "calibrate_visit1_detector0", out=buf, stream="stdout", header=False)
    assert not buf.getvalue().startswith("==>") and "calibrating 1 0" in buf.getvalue()
    with pytest.raises(ValueError, match="stream"):
        print_logs(run, "calibrate_visit1_detector0", out=buf, stream="both!")


def test_unknown_job_suggests_the_nearest_name(run: Run) -> None:
    with pytest.raises(RunError, match=r"run 'toy/run': no job named 'calibrate_visit2_detectr1' "
                                       r"\(did you mean 'calibrate_visit2_detector1'\?\)"):
        attempt_logs(run, "calibrate_visit2_detectr1")
    with pytest.raises(RunError, match=r"no job named 'zzz'$"):
        attempt_logs(run, "zzz")


def test_unknown_attempt_lists_those_that_exist(run: Run) -> None:
    with pytest.raises(RunError, match=r"job 'calibrate_visit2_detector1' has no attempt 3 \(attempts: 1, 2\)"):
        attempt_logs(run, "calibrate_visit2_detector1", 3)


def test_a_job_that_never_ran(run: Run) -> None:
    with pytest.raises(RunError, match=r"job 'coadd_tract0_patch1' has never run \(status UNREADY\)"):
        print_logs(run, "coadd_tract0_patch1", out=io.StringIO())


def test_a_log_leading_outside_the_run_is_refused(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    out, err, _ = attempt_logs(run, "calibrate_visit2_detector1")
    err.unlink()
    err.symlink_to(secret)
    with pytest.raises(RunError, match=r"stderr of job 'calibrate_visit2_detector1' attempt 2 .* resolves to "
                                       r".*secret\.txt, outside the run's submit directory"):
        attempt_logs(run, "calibrate_visit2_detector1")
    buf = io.StringIO()
    with pytest.raises(RunError, match="outside the run's submit directory"):
        print_logs(run, "calibrate_visit2_detector1", out=buf)
    assert "not yours" not in buf.getvalue()
    # a whole log directory swapped for a link elsewhere is refused the same way
    logs = run.log_dir / "calibrate"
    moved = tmp_path / "elsewhere"
    logs.rename(moved)
    logs.symlink_to(moved)
    with pytest.raises(RunError, match="outside the run's submit directory"):
        attempt_logs(run, "calibrate_visit1_detector0")


def test_a_recorded_path_outside_the_run_is_never_read(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    a = run.store.attempts(0)[-1]
    run.store.write(attempts=[{**a, "stderr": "/etc/passwd", "stdout": "/../../etc/passwd"}])
    out, err, n = attempt_logs(run, "calibrate_visit1_detector0")
    assert out.is_relative_to(run.submit_dir) and err.is_relative_to(run.submit_dir)
    assert err.name == f"calibrate_visit1_detector0.{n}.err"


def test_follow_prints_what_comes_until_the_attempt_ends(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0,))
    cmd = "echo a; sleep 1.5; echo b; echo oops >&2; cp {inputs.raw} {outputs.calexp}"
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"], cmd)}}, repo=repo))
    engine = start_orchestrator(run.submit_dir)
    try:
        name = "calibrate_visit1_detector0"

        def started() -> bool:
            rows = run.store.attempts(0)
            if not rows or rows[-1]["status"] != "RUNNING":
                return False
            out = attempt_logs(run, name)[0]
            return out.exists() and "a\n" in out.read_text()

        wait_for(started, timeout=30)
        assert "b\n" not in attempt_logs(run, name)[0].read_text()  # still running when we start following
        buf = io.StringIO()
        t0 = time.monotonic()
        status = print_logs(run, name, out=buf, follow=True, poll=0.05)
        took = time.monotonic() - t0
        assert status == "SUCCEEDED" and run.store.attempts(0)[-1]["status"] == "SUCCEEDED"
        assert took < 20
        lines = buf.getvalue().splitlines()
        assert "a" in lines and "b" in lines and "oops" in lines
        assert lines.index("a") < lines.index("b")
        assert lines[0].startswith("==> stdout: ") and "RUNNING" in lines[0]
        assert engine.wait(30) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_follow_of_a_job_that_has_not_started_waits_for_it(tmp_path: Path) -> None:
    """``logs RUN JOB --follow`` before the job runs (it waits for another): as ``tail -F``, wait."""
    repo = make_toy_repo(tmp_path / "repo", visits=(1,), detectors=(0, 1))
    cmd = "sleep 1.5; echo hello {detector}; cp {inputs.raw} {outputs.calexp}"
    run = prepare(write_submit(tmp_path, {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"], cmd)}}, repo=repo, site={"local": {"cores": 1}}))
    engine = start_orchestrator(run.submit_dir)
    try:
        wait_for(lambda: bool(run.store.attempts()), timeout=30)
        started = {a["job_id"] for a in run.store.attempts()}
        other = next(n for i, (n,) in enumerate(run.store.job_columns("name")) if i not in started)  # one core
        buf = io.StringIO()
        assert print_logs(run, other, out=buf, follow=True, poll=0.05) == "SUCCEEDED"
        text = buf.getvalue()
        assert "has not started" in text and "hello" in text
        assert engine.wait(30) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()


def test_follow_of_an_ended_attempt_returns_at_once(run: Run) -> None:
    buf = io.StringIO()
    t0 = time.monotonic()
    assert print_logs(run, "calibrate_visit1_detector0", out=buf, follow=True, poll=5) == "SUCCEEDED"
    assert time.monotonic() - t0 < 2
    assert "calibrating 1 0" in buf.getvalue()


def test_follow_stops_when_the_engine_is_gone(tmp_path: Path) -> None:
    """An attempt the store still shows RUNNING after its engine died must not be followed forever."""
    run = flaky_run(tmp_path)
    a = run.store.attempts(0)[-1]
    run.store.write(attempts=[{**a, "status": "RUNNING", "end": None}])
    run.store.set_run(status="RUNNING", orchestrator_pid=2**22 + 12345, orchestrator_start=1.0)
    done = threading.Event()
    result: list[str] = []

    def follow() -> None:
        result.append(print_logs(run, "calibrate_visit1_detector0", out=io.StringIO(), follow=True, poll=0.05))
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    assert done.wait(10), "follow did not stop"
    assert result == ["RUNNING"]


def test_partial_last_line_is_printed_at_the_end(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    out = attempt_logs(run, "calibrate_visit1_detector1")[0]
    with open(out, "a") as fh:
        fh.write("no newline at the end")
    os.utime(out)
    buf = io.StringIO()
    print_logs(run, "calibrate_visit1_detector1", out=buf, follow=True, poll=0.05, stream="stdout")
    assert buf.getvalue().endswith("no newline at the end\n")
