"""The trace file: one TSV row per attempt of every job, true to the state store, fast at scale."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from pathlib import Path

import pytest

from batchprod.engine.control import LocalExecutor
from batchprod.engine.prepare import prepare
from batchprod.report.trace import COLUMNS, iso_times, write_trace
from batchprod.state.run import Run, add_restart_overrides
from batchprod.testing import command_task, make_toy_repo, write_submit

# visit 1 detector 0 fails its first attempt only; visit 2 detector 1 fails every attempt
FLAKY = (
    'case "$(echo {dataId})" in '
    '"visit=1 detector=0") if [ "$BATCHPROD_ATTEMPT" = 1 ]; then echo "flaky attempt" >&2; exit 3; fi;; '
    '"visit=2 detector=1") echo "ValueError: bad pixel" >&2; exit 5;; '
    "esac; cat {inputs.raw} > {outputs.calexp}"
)


def flaky_run(tmp_path: Path) -> Run:
    repo = make_toy_repo(tmp_path / "repo")
    pipeline = {"tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], FLAKY),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }}
    run = prepare(write_submit(tmp_path, pipeline, repo=repo, numberOfRetries=1, requestWalltime=600,
                               pipetask={"coadd": {"requestMemory": 120}},
                               finalJob={"command": "echo final", "whenRun": "ALWAYS", "requestMemory": 50}))
    assert LocalExecutor(run).execute() == "FAILED"
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return flaky_run(tmp_path_factory.mktemp("trace"))


def read_trace(run: Run) -> tuple[list[str], list[dict[str, str]], int]:
    buf = io.StringIO()
    n = write_trace(run, buf)
    lines = buf.getvalue().splitlines()
    rows = list(csv.DictReader(io.StringIO(buf.getvalue()), delimiter="\t", quoting=csv.QUOTE_NONE))
    return lines[0].split("\t"), rows, n


def by_job(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["job"], []).append(r)
    return out


def test_one_row_per_attempt_with_its_outcome(run: Run) -> None:
    header, rows, n = read_trace(run)
    assert tuple(header) == COLUMNS
    assert n == len(rows) == len(run.store.attempts()) == 8
    jobs = by_job(rows)
    flaky = jobs["calibrate_visit1_detector0"]
    assert [(r["attempt"], r["status"], r["class"], r["exit"]) for r in flaky] == [
        ("1", "FAILED", "user_error", "3"), ("2", "SUCCEEDED", "", "0")]
    bad = jobs["calibrate_visit2_detector1"]
    assert [(r["attempt"], r["status"], r["class"], r["exit"]) for r in bad] == [
        ("1", "FAILED", "user_error", "5"), ("2", "FAILED", "user_error", "5")]
    assert [r["attempt"] for r in jobs["calibrate_visit1_detector1"]] == ["1"]
    assert "coadd_tract0_patch1" not in jobs  # unready: it never ran, so it has no attempt
    (final,) = jobs["finalJob"]
    assert (final["label"], final["data_id"], final["status"]) == ("finalJob", "", "SUCCEEDED")
    assert flaky[0]["data_id"] == "visit=1,detector=0"
    assert jobs["coadd_tract0_patch0"][0]["data_id"] == "tract=0,patch=0"


def test_requests_and_where_it_ran(run: Run) -> None:
    _, rows, _ = read_trace(run)
    jobs = by_job(rows)
    assert {r["request_memory_mb"] for r in rows if r["label"] == "calibrate"} == {"100"}
    assert jobs["coadd_tract0_patch0"][0]["request_memory_mb"] == "120"
    assert jobs["finalJob"][0]["request_memory_mb"] == "50"
    assert {(r["request_cpus"], r["request_walltime_s"], r["site"]) for r in rows} == {("1", "600", "local")}
    stored = {(a["job_id"], a["number"]): a for a in run.store.attempts()}
    names = {j["name"]: j["id"] for j in run.store.jobs()}
    for r in rows:
        a = stored[(names[r["job"]], int(r["attempt"]))]
        assert r["host"] == a["host"] and r["stdout"] == a["stdout"] and r["stderr"] == a["stderr"]
        assert r["stderr"].endswith(f"{r['job']}.{r['attempt']}.err")
        assert float(r["cpu_s"]) == pytest.approx(a["cpu_s"], abs=1e-3)
        assert r["signal"] == ""


def test_times_are_local_iso_8601_and_consistent(run: Run) -> None:
    _, rows, _ = read_trace(run)
    stored = {(a["job_id"], a["number"]): a for a in run.store.attempts()}
    names = {j["name"]: j["id"] for j in run.store.jobs()}
    for r in rows:
        a = stored[(names[r["job"]], int(r["attempt"]))]
        submit, start, end = (datetime.fromisoformat(r[c]) for c in ("submit", "start", "end"))
        assert submit.tzinfo is not None and submit.utcoffset() == datetime.fromtimestamp(a["start"]).astimezone().utcoffset()
        assert abs(submit.timestamp() - a["start"]) < 0.001 and abs(end.timestamp() - a["end"]) < 0.001
        assert start == submit and float(r["queue_s"]) == 0  # the local backend starts what it is handed
        assert float(r["run_s"]) == pytest.approx(a["wall_s"], abs=0.002)
        assert "None" not in r.values() and "nan" not in r.values()


def test_iso_times_match_datetime_across_a_dst_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        ts = [1711846799.5, 1711846800.25, 1711846800.9996, None, 1729990800.0 + 1234.5678]
        want = [datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds") if t else "" for t in ts]
        assert iso_times(ts) == want
        assert want[0].endswith("+01:00") and want[1].endswith("+02:00")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_written_to_a_file(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "trace.tsv"
    n = write_trace(run, path)
    lines = path.read_text().splitlines()
    assert len(lines) == n + 1 and lines[0] == "\t".join(COLUMNS)
    assert all(len(ln.split("\t")) == len(COLUMNS) for ln in lines)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.tsv"]  # no temporary file left


def test_unwritable_path_is_one_line(run: Run, tmp_path: Path) -> None:
    from batchprod.errors import RunError

    with pytest.raises(RunError, match="cannot write the trace"):
        write_trace(run, tmp_path / "no" / "such" / "dir" / "trace.tsv")


def test_odd_values_stay_in_their_cell(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    a = run.store.attempts(0)[0]
    run.store.write(attempts=[{**a, "host": "bad\thost\nname", "signal": 9, "exit_code": None, "cpu_s": None}])
    _, rows, _ = read_trace(run)
    r = by_job(rows)["calibrate_visit1_detector0"][0]
    assert (r["host"], r["signal"], r["exit"], r["cpu_s"]) == ("bad host name", "SIGKILL", "", "")
    assert len(rows) == 8


def test_batch_backend_start_is_not_recorded_so_left_empty(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    run.store.set_run(wms="slurm")
    _, rows, _ = read_trace(run)
    for r in rows:
        assert r["submit"] and r["end"]
        assert r["start"] == r["queue_s"] == r["run_s"] == ""


def test_restart_overrides_apply_from_when_they_were_given(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    add_restart_overrides(run, {"requestWalltime": 900})
    LocalExecutor(Run(run.submit_dir)).execute()
    run = Run(run.submit_dir)
    _, rows, n = read_trace(run)
    bad = by_job(rows)["calibrate_visit2_detector1"]
    assert [(r["attempt"], r["request_walltime_s"]) for r in bad] == [("1", "600"), ("2", "600"), ("3", "900"),
                                                                      ("4", "900")]
    assert n == len(run.store.attempts())


def test_many_attempts_quickly(tmp_path: Path) -> None:
    run = flaky_run(tmp_path)
    template = run.store.attempts(0)[0]
    now = time.time()
    n_jobs = len(run.store.jobs())
    extra = [{**template, "job_id": j, "number": 100 + k, "start": now + k, "end": now + k + 1.5}
             for j in range(n_jobs) for k in range(100_000 // n_jobs)]
    run.store.write(attempts=extra)
    total = len(run.store.attempts())
    assert total >= 100_000
    t0 = time.perf_counter()
    n = write_trace(run, tmp_path / "big.tsv")
    took = time.perf_counter() - t0
    assert n == total
    assert took < 10, f"{took:.1f}s for {n} attempts"
