"""What an operator reads is true: the payload's own cause, progress off a terminal, whole lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.execution.logs import causal_line
from batchprod.testing import command_task, write_submit


def _failing_run(tmp_path: Path, toy_repo: Path, cmd: str, **keys):
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd),
                          "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"])}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, **keys))
    LocalExecutor(run).execute()
    return run


def test_failures_grouped_by_what_the_payload_said(tmp_path: Path, toy_repo: Path, cli) -> None:
    """No 'error' word in the payload's stderr: its own last line is still the cause and the group."""
    cmd = "echo starting; echo saturated reference star catalog for visit {visit} >&2; exit 5"
    run = _failing_run(tmp_path, toy_repo, cmd)
    r = cli("report", run.submit_dir, "--failures", "--json")
    f = json.loads(r.output)
    assert f["failed"] == 4
    (g,) = f["groups"]
    assert g["count"] == 4 and g["cause"].startswith("saturated reference star catalog for visit ")
    assert all(j["cause"].startswith("saturated reference star catalog") for j in f["jobs"])
    text = cli("report", run.submit_dir, "--failures").output
    assert "None" not in text and "exit=" not in text
    assert "4 failed jobs in 1 failure signature " in text and "exit code 5" in text
    assert "cause: saturated reference star catalog for visit 1" in text


def test_a_multi_line_commands_cause_is_what_it_printed_not_its_text(tmp_path: Path, toy_repo: Path, cli) -> None:
    """batchprod's own error line names the command on one line: its second line is not 'the cause'."""
    cmd = "echo saturated reference star catalog for visit {visit} >&2; exit 5\ncat {inputs.raw} > {outputs.calexp}"
    run = _failing_run(tmp_path, toy_repo, cmd)
    f = json.loads(cli("report", run.submit_dir, "--failures", "--json").output)
    (g,) = f["groups"]
    assert g["cause"].startswith("saturated reference star catalog for visit ")
    assert {j["cause"] for j in f["jobs"]} == {f"saturated reference star catalog for visit {v}" for v in (1, 2)}
    err = next(Path(run.submit_dir).rglob("calibrate_visit1_detector0*.err")).read_text()
    assert err.splitlines()[-1].startswith("error: calibrate visit=1 detector=0: command exited with code 5: echo ")
    assert "exit 5; cat " in err.splitlines()[-1]  # both lines of the command, on batchprod's one line


def test_cause_falls_back_to_batchprod_only_when_the_payload_said_nothing(tmp_path: Path, toy_repo: Path,
                                                                           cli) -> None:
    run = _failing_run(tmp_path, toy_repo, "exit 3")
    f = json.loads(cli("report", run.submit_dir, "--failures", "--json").output)
    assert f["groups"][0]["cause"]  # never None
    assert "exited with code 3" in f["groups"][0]["cause"]


def test_causal_line_reduces_tracebacks_and_skips_our_lines(tmp_path: Path) -> None:
    err = tmp_path / "err"
    err.write_text("quantum calibrate visit=1\nWARNING: slow disk\nTraceback (most recent call last):\n"
                   '  File "x.py", line 3, in f\n    raise ValueError("bad flat")\nValueError: bad flat for 3\n'
                   "error: calibrate visit=1: command exited with code 1: python x.py\n")
    assert causal_line(err) == "ValueError: bad flat for 3"
    out = tmp_path / "out"
    out.write_text("+ mytool\nprocessing 12 sources\n\n---\n")
    err.write_text("error: calibrate visit=1: command exited with code 4: mytool\n")
    assert causal_line(err, out) == "processing 12 sources"


def test_failures_limit_says_how_many_and_every_group_has_an_example(tmp_path: Path, toy_repo: Path, cli) -> None:
    cmd = ("if test {detector} = 0; then echo flat field missing >&2; exit 2; fi; "
           "echo no astrometric match >&2; exit 3")
    run = _failing_run(tmp_path, toy_repo, cmd)
    f = json.loads(cli("report", run.submit_dir, "--failures", "--json", "--limit", "1").output)
    assert f["failed"] == 4 and len(f["groups"]) == 2
    assert f["shown"] == 2  # the limit gives way to one example per signature
    causes = {j["cause"] for j in f["jobs"]}
    assert causes == {"flat field missing", "no astrometric match"}
    text = cli("report", run.submit_dir, "--failures", "--limit", "1").output
    assert "2 of 4 failed jobs shown" in text and "--all" in text
    f = json.loads(cli("report", run.submit_dir, "--failures", "--json", "--all").output)
    assert f["shown"] == 4


def test_submit_piped_prints_progress_lines(tmp_path: Path, toy_repo: Path) -> None:
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                    "sleep 0.4; cp {inputs.raw} {outputs.calexp}")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 1}})
    env = {**os.environ, "BATCHPROD_PROGRESS_INTERVAL": "0.3"}
    p = subprocess.run([sys.executable, "-m", "batchprod.cli", "submit", str(cfg)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " jobs done (" in ln]
    assert len(lines) >= 3, p.stdout
    assert lines[0].split()[1] == "toy/run:" and "of 4 jobs done" in lines[0]
    assert lines[-1].endswith("4 of 4 jobs done (succeeded 4)")
    assert any("jobs/s" in ln for ln in lines[1:-1]), lines


def test_progress_goes_on_while_one_long_job_runs_and_the_last_line_is_said_once(tmp_path: Path,
                                                                                 toy_repo: Path) -> None:
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                    "sleep 2; cp {inputs.raw} {outputs.calexp}")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, payload={"dataQuery": "visit = 1 AND detector = 0"})
    env = {**os.environ, "BATCHPROD_PROGRESS_INTERVAL": "0.3"}
    p = subprocess.run([sys.executable, "-m", "batchprod.cli", "submit", str(cfg)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " jobs done (" in ln]
    assert sum("0 of 1 jobs done (running 1)" in ln for ln in lines) >= 3, lines  # nothing changed, still said
    assert sum(ln.endswith("1 of 1 jobs done (succeeded 1)") for ln in lines) == 1, lines


def test_tables_off_a_terminal_are_never_cut(tmp_path: Path, toy_repo: Path) -> None:
    long = "calibrate_with_a_rather_long_task_label_that_an_operator_will_copy_and_paste_x"
    pipeline = {"tasks": {long[:60]: command_task(["visit", "detector"], ["raw"], ["calexp"])}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo,
                       payload={"outputRun": "u/operator/a_very_long_output_run_name_for_a_big_reprocessing/run1"})
    env = {**os.environ, "COLUMNS": "80"}
    bp = [sys.executable, "-m", "batchprod.cli"]
    assert subprocess.run([*bp, "submit", str(cfg)], capture_output=True, env=env, timeout=120).returncode == 0
    for cmd in (["report"], ["runs"]):
        out = subprocess.run([*bp, *cmd, "--root", str(tmp_path / "submit")] if cmd == ["runs"] else
                             [*bp, *cmd, "u/operator/a_very_long_output_run_name_for_a_big_reprocessing/run1",
                              "--root", str(tmp_path / "submit")],
                             capture_output=True, text=True, env=env, timeout=60).stdout
        assert "u/operator/a_very_long_output_run_name_for_a_big_reprocessing/run1" in out, out
        if cmd == ["report"]:
            assert long[:60] in out, out


def test_trace_logs_and_watch_from_the_command_line(tmp_path: Path, toy_repo: Path, cli) -> None:
    cmd = "echo visit {visit} went wrong >&2; test {detector} = 0 || exit 4; cp {inputs.raw} {outputs.calexp}"
    run = _failing_run(tmp_path, toy_repo, cmd, numberOfRetries=1)
    trace = tmp_path / "trace.tsv"
    r = cli("report", run.submit_dir, "--trace", trace)
    assert r.exit_code == 1
    rows = trace.read_text().splitlines()
    assert len(rows) == 1 + len(run.store.attempts())
    assert rows[0].split("\t")[:4] == ["job", "label", "data_id", "attempt"]
    r = cli("logs", run.submit_dir, "calibrate_visit1_detector1", "--stderr")
    assert r.exit_code == 0 and "visit 1 went wrong" in r.output and "attempt 2" in r.output
    r = cli("logs", run.submit_dir, "calibrate_visit1_detector9")
    assert r.exit_code == 2 and "did you mean" in r.output
    # --watch on a live detached run: lines until it ends, then the table and the run's exit code
    slow = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                "sleep 0.5; cp {inputs.raw} {outputs.calexp}")}}
    other = prepare(write_submit(tmp_path / "w", slow, repo=toy_repo, payload={"outputRun": "toy/watched"},
                                 site={"local": {"cores": 1}}))
    assert cli("restart", other.submit_dir, "--detach").exit_code == 0
    p = subprocess.run([sys.executable, "-m", "batchprod.cli", "report", str(other.submit_dir), "--watch",
                        "--interval", "0.3"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "jobs done" in ln]
    assert len(lines) >= 2 and any("RUNNING" in ln for ln in lines) and "SUCCEEDED, 4 of 4 jobs done" in lines[-1]


def test_killed_engine_shows_interrupted_with_the_hint_and_restart_says_what_it_does(tmp_path: Path,
                                                                                       toy_repo: Path,
                                                                                       cli) -> None:
    import signal

    from batchprod.testing import start_orchestrator, wait_for

    flag = tmp_path / "go"
    cmd = f"test {{detector}} = 0 || test -e {flag} || sleep 60; cp {{inputs.raw}} {{outputs.calexp}}"
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 2}}))
    orch = start_orchestrator(run.submit_dir)
    wait_for(lambda: len(run.store.jobs(status="SUCCEEDED")) >= 2 and run.store.attempts(status="RUNNING"))
    orch.send_signal(signal.SIGKILL)
    orch.wait()
    s = json.loads(cli("report", run.submit_dir, "--json").output)
    assert s["status"] == "INTERRUPTED" and s["jobs"].get("running", 0) == 0 and s["jobs"]["interrupted"] >= 1
    assert s["hint"] == f"batchprod restart {run.submit_dir}"
    text = cli("report", run.submit_dir).output
    assert "INTERRUPTED" in text and f"batchprod restart {run.submit_dir}" in text and "running" not in text
    assert s["ended"] == "" and s["last_seen"] and f"engine last seen {s['last_seen']}" in text
    assert " ended " not in text  # its engine died: the run did not end
    flag.touch()
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 0, r.output
    assert "restart: kept 2 succeeded jobs, re-running 2 jobs" in r.output


def test_an_80_column_terminal_keeps_whole_names(tmp_path: Path, toy_repo: Path) -> None:
    """On a real terminal (a pty via script(1)) of 80 columns, names and headers are never cut."""
    import re
    import shutil

    import pytest

    if not shutil.which("script"):
        pytest.skip("script(1) not installed")
    name = "u/operator/a_very_long_output_run_name_for_a_big_reprocessing/run1"
    long_label = "calibrate_with_a_rather_long_label_x"
    pipeline = {"tasks": {long_label: command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                   "echo the flat field for this detector is saturated >&2; exit 3")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, payload={"outputRun": name})
    bp = f"{sys.executable} -m batchprod.cli"
    root = tmp_path / "submit"
    subprocess.run([sys.executable, "-m", "batchprod.cli", "submit", str(cfg)], capture_output=True, timeout=120)
    for cmd in (f"runs --root {root}", f"report {name} --root {root}", f"report {name} --root {root} --failures"):
        p = subprocess.run(["script", "-qc", f"{bp} {cmd}", "/dev/null"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "80", "LINES": "50", "TERM": "xterm"}, timeout=60)
        out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", p.stdout)
        assert "…" not in out, out
        assert max(len(ln) for ln in out.splitlines()) <= 80, out
        assert name in out, out
        if "report" in cmd:
            assert long_label in out, out
        if "--failures" in cmd:
            assert f"{long_label}_visit1_detector0" in out and "the flat field for this detector is saturated" in out


def test_final_job_reflects_the_final_state_and_elapsed_skips_the_idle_gap(tmp_path: Path, toy_repo: Path,
                                                                           cli) -> None:
    import time

    from batchprod.graph import Registry

    flag = tmp_path / "broken"
    flag.touch()
    cmd = f"test {{detector}} != 1 || test ! -e {flag} || exit 3; cp {{inputs.raw}} {{outputs.calexp}}"
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cmd)}}
    out = toy_repo / "toy" / "run"
    final = {"command": f"ls {out / 'calexp'} | wc -l > {out / 'count.txt'}", "outputs": ["count.txt"]}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, finalJob=final))
    assert cli("restart", run.submit_dir).exit_code == 1
    assert (out / "count.txt").read_text().strip() == "2"  # the partial first run
    flag.unlink()
    time.sleep(2.0)  # the operator's coffee: not execution time
    r = cli("restart", run.submit_dir)
    assert r.exit_code == 0
    # the final job had succeeded, but it runs again: it is not among the kept
    assert "restart: kept 2 succeeded jobs, re-running 2 jobs and the final job" in r.output
    assert (out / "count.txt").read_text().strip() == "4"  # the final job ran again, on everything
    final_rows = [o for o in run.store.outputs() if o["path"].endswith("count.txt")]
    assert len(final_rows) == 1
    from batchprod.execution.protocol import file_checksum

    assert final_rows[0]["checksum"] == file_checksum(out / "count.txt")
    reg = Registry(toy_repo / "registry.db")
    (rec,) = reg.find_datasets("count", runs=["toy/run"])
    reg.close()
    assert rec.checksum == final_rows[0]["checksum"]
    assert [a["status"] for a in run.store.attempts(run.store.job_by_name("finalJob")["id"])] == ["SUCCEEDED"] * 2
    s = json.loads(cli("report", run.submit_dir, "--json").output)
    from datetime import datetime

    started, ended = datetime.fromisoformat(s["started"]), datetime.fromisoformat(s["ended"])
    assert started.tzinfo is not None and (ended - started).total_seconds() >= 2.0
    assert s["elapsed_s"] < (ended - started).total_seconds() - 1.5  # the idle gap is not counted
    text = cli("report", run.submit_dir).output
    assert f"started {s['started']}" in text and f"ended {s['ended']}" in text


def test_progress_colours_and_words_tell_the_truth() -> None:
    import io

    from rich.console import Console

    from batchprod.report.progress import ProgressView, style_for, words

    assert style_for({"succeeded": 5, "running": 2}) == "green"  # no red while nothing failed
    assert style_for({"succeeded": 5, "unready": 1}) == "yellow"
    assert style_for({"succeeded": 5, "failed": 1}) == "red"  # a FAILED run is never solid green
    assert words({"succeeded": 1200, "failed": 1, "running": 0}) == "succeeded 1,200, failed 1"
    out = io.StringIO()
    view = ProgressView("r", 3, Console(file=out, width=200), interval=0.0)
    with view:
        view({"SUCCEEDED": 1, "RUNNING": 1, "QUEUED": 1}, {"a": {"SUCCEEDED": 1, "RUNNING": 1, "QUEUED": 1}})
        view({"SUCCEEDED": 2, "FAILED": 1}, {"a": {"SUCCEEDED": 2, "FAILED": 1}})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("r: 1 of 3 jobs done (succeeded 1, running 2)")  # queued is counted as running, as in report
    assert lines[-1].endswith("r: 3 of 3 jobs done (succeeded 2, failed 1)")


def test_new_user_findings(tmp_path: Path, toy_repo: Path, cli) -> None:
    """A run found by the name 'runs' shows even when submitPath does not end in it; a restart of a
    finished run changes nothing; a failed submit says what to do next; hints for near misses."""
    import yaml

    cfg = write_submit(tmp_path, repo=toy_repo, submitPath=str(tmp_path / "sub" / "fixed"))
    r = cli("submit", cfg)
    assert r.exit_code == 0
    root = tmp_path / "sub"
    assert cli("report", "toy/run", "--root", root).exit_code == 0
    before = json.loads(cli("report", "toy/run", "--root", root, "--json").output)
    r = cli("restart", "toy/run", "--root", root)
    assert r.exit_code == 0 and "nothing to do" in r.output
    after = json.loads(cli("report", "toy/run", "--root", root, "--json").output)
    assert after["ended"] == before["ended"]
    r = cli("logs", "toy/run", "coadd", "--root", root)
    assert r.exit_code == 2 and "coadd_tract0_patch0" in r.output
    r = cli("restart", "toy/run", "--root", root, "-o", "requestWaltime=10")
    assert r.exit_code == 2 and "did you mean 'requestWalltime'" in r.output
    r = cli("restart", "toy/run", "--root", root, "-o", "requestWalltime=1h")
    assert r.exit_code == 2 and "HH:MM:SS" in r.output
    assert "no failed jobs" in cli("report", "toy/run", "--root", root, "--failures").output
    data = yaml.safe_load(cfg.read_text())
    failing = _failing_run(tmp_path / "f", toy_repo, "echo no reference catalog >&2; exit 3",
                           payload={**data["payload"], "outputRun": "toy/failing"})
    r = cli("restart", failing.submit_dir)
    assert r.exit_code == 1 and f"next: batchprod report {failing.submit_dir} --failures" in r.output


def test_restart_piped_into_head_runs_to_the_end(tmp_path: Path, toy_repo: Path) -> None:
    """`batchprod restart RUN | head -1`: the reader leaves after one line; the run still finishes."""
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                                    "sleep 0.5; cp {inputs.raw} {outputs.calexp}")}}
    run = prepare(write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 1}}))
    env = {**os.environ, "BATCHPROD_PROGRESS_INTERVAL": "0.2"}
    exe = str(Path(sys.executable).parent / "batchprod")
    p = subprocess.run(f"{exe} restart {run.submit_dir} | head -1; echo rc=${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines()[-1] == "rc=0", p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
    assert {j["status"] for j in run.store.jobs()} == {"SUCCEEDED"}
