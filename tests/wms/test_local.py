"""The local WMS with real processes: success, failure propagation, retries, priorities, budget, cancel."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from batchprod.engine.control import LocalExecutor, cancel
from batchprod.engine.prepare import prepare
from batchprod.execution.process import group_members
from batchprod.execution.states import FailureClass, JobState
from batchprod.report import summarize
from batchprod.state.run import Run
from batchprod.testing import command_task, make_toy_repo, shell_launch, write_submit
from batchprod.wms.local import LocalBackend, LocalService, LocalSettings


def run_local(cfg: Path, **kw) -> tuple[Run, str]:
    run = prepare(cfg)
    state = LocalExecutor(run, **kw).execute()
    return run, state


def job_states(run: Run) -> dict[str, str]:
    return {j["name"]: j["status"] for j in run.store.jobs()}


def test_success_records_states_attempts_and_outputs(tmp_path: Path, toy_repo: Path) -> None:
    cfg = write_submit(tmp_path, repo=toy_repo)
    run, state = run_local(cfg)
    assert state == "SUCCEEDED"
    assert set(job_states(run).values()) == {"SUCCEEDED"}
    outs = run.store.outputs()
    assert len(outs) == 4 + 2
    coadd = [o for o in outs if o["dataset_type"] == "coadd"]
    for o in coadd:
        text = Path(o["path"]).read_text()
        assert "raw visit=" in text and "coadd" in text  # really produced from its inputs
        assert o["checksum"].startswith("sha256:") and o["size"] == len(text.encode())
    for a in run.store.attempts():
        assert a["status"] == "SUCCEEDED" and a["exit_code"] == 0
        # the job's own peak, or None (too short to sample and under what the kernel's figure owes to
        # the orchestrator); never the orchestrator's own size
        assert a["peak_rss_mb"] is None or 0 < a["peak_rss_mb"] < 50
        assert Path(a["stdout"]).is_file() and Path(a["stderr"]).is_file()
    s = summarize(run)
    assert s["status"] == "SUCCEEDED"
    assert s["labels"]["calibrate"]["succeeded"] == 4 and s["labels"]["coadd"]["total"] == 2


def test_failure_marks_downstream_unready_and_independent_work_runs(tmp_path: Path, toy_repo: Path) -> None:
    pipeline = {"tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                                  "test {detector} != 1 || {{ echo 'ValueError: bad pixels' >&2; exit 3; }}; "
                                  "cp {inputs.raw} {outputs.calexp}"),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, numberOfRetries=1)
    run, state = run_local(cfg)
    assert state == "FAILED"
    st = job_states(run)
    assert st["calibrate_visit1_detector1"] == st["calibrate_visit2_detector1"] == "FAILED"
    assert st["calibrate_visit1_detector0"] == st["calibrate_visit2_detector0"] == "SUCCEEDED"
    assert st["coadd_tract0_patch1"] == "UNREADY"
    assert st["coadd_tract0_patch0"] == "SUCCEEDED"  # independent work still ran
    failed = run.store.job_by_name("calibrate_visit1_detector1")
    assert failed["attempts"] == 2 and failed["failure_class"] == "user_error" and failed["exit_code"] == 3
    atts = run.store.attempts(failed["id"])
    assert [a["number"] for a in atts] == [1, 2]
    assert "ValueError: bad pixels" in Path(atts[-1]["stderr"]).read_text()
    s = summarize(run)
    assert s["labels"]["calibrate"] == {**s["labels"]["calibrate"], "failed": 2, "succeeded": 2}
    assert s["labels"]["coadd"]["unready"] == 1


def test_retry_succeeds_on_second_attempt(tmp_path: Path, toy_repo: Path) -> None:
    pipeline = {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"],
        'test "$BATCHPROD_ATTEMPT" -ge 2 && cp {inputs.raw} {outputs.calexp}')}}
    run, state = run_local(write_submit(tmp_path, pipeline, repo=toy_repo, numberOfRetries=2))
    assert state == "SUCCEEDED"
    assert {j["attempts"] for j in run.store.jobs()} == {2}
    assert [a["status"] for a in run.store.attempts(0)] == ["FAILED", "SUCCEEDED"]


def _timeline_pipeline(seconds: float) -> dict:
    cmd = ("date +%s.%N > {outputs.out}; sleep " + str(seconds) + "; date +%s.%N >> {outputs.out}")
    return {"tasks": {
        "low": command_task(["visit", "detector"], ["raw"], ["out"], cmd.replace("out}", "out}")),
        "high": command_task(["visit", "detector"], ["raw"], ["out2"], cmd.replace("outputs.out", "outputs.out2")),
    }}


def _intervals(run: Run) -> dict[str, tuple[float, float]]:
    out = {}
    for o in run.store.outputs():
        lines = Path(o["path"]).read_text().split()
        job = next(j["name"] for j in run.store.jobs() if j["id"] == o["job_id"])
        out[job] = (float(lines[0]), float(lines[1]))
    return out


def _max_overlap(iv: dict[str, tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in iv.values()] + [(e, -1) for _, e in iv.values()])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_priorities_respected(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2), detectors=(0, 1))
    cfg = write_submit(tmp_path, _timeline_pipeline(0.05), repo=repo, site={"local": {"cores": 1}},
                       pipetask={"high": {"priority": 10}})
    run, state = run_local(cfg)
    assert state == "SUCCEEDED"
    iv = _intervals(run)
    last_high = max(e for n, (s, e) in iv.items() if n.startswith("high"))
    first_low = min(s for n, (s, e) in iv.items() if n.startswith("low"))
    assert last_high <= first_low, "a low-priority job started before every high-priority job finished"


@pytest.mark.parametrize(("site", "limit"), [({"cores": 2}, 2), ({"cores": 4, "memory": 250}, 2), ({"cores": 3}, 3),
                                                  ({"cores": 4, "maxJobs": "{n}"}, 2)])
def test_resource_budget_never_exceeded(tmp_path: Path, site: dict, limit: int) -> None:
    repo = make_toy_repo(tmp_path / "repo", visits=(1, 2, 3), detectors=(0, 1))
    cfg = write_submit(tmp_path, _timeline_pipeline(0.4), repo=repo, site={"local": site}, requestMemory=100,
                       variables={"n": 2})  # site values are substituted
    run, state = run_local(cfg)
    assert state == "SUCCEEDED"
    overlap = _max_overlap(_intervals(run))  # measured by the jobs themselves
    assert overlap <= limit
    assert overlap == limit  # and the budget is used, not left idle


def test_job_bigger_than_site_is_rejected_at_prepare(tmp_path: Path, toy_repo: Path) -> None:
    from batchprod.errors import ConfigError

    cfg = write_submit(tmp_path, repo=toy_repo, site={"local": {"cores": 2}}, pipetask={"coadd": {"requestCpus": 4}})
    with pytest.raises(ConfigError, match=r"submit.yaml: key 'pipetask.coadd.requestCpus': job group 'coadd': "
                                          r"requestCpus 4 exceeds site 'local' cores 2"):
        prepare(cfg)
    assert not (tmp_path / "submit").exists() or not any((tmp_path / "submit").rglob("state.db"))


@pytest.mark.parametrize(("when", "ran"), [("ALWAYS", True), ("SUCCESS", False)])
def test_final_job_runs_last(tmp_path: Path, toy_repo: Path, when: str, ran: bool) -> None:
    marker = tmp_path / "final.txt"
    pipeline = {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"], "test {detector} != 1 && cp {inputs.raw} {outputs.calexp}")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo,
                       finalJob={"command": f"ls {toy_repo}/toy/run/calexp | wc -l > {marker}", "whenRun": when})
    run, state = run_local(cfg)
    assert state == "FAILED"
    final = run.store.job_by_name("finalJob")
    if ran:
        assert final["status"] == "SUCCEEDED"
        assert marker.read_text().strip() == "2"  # saw every output of the jobs before it
        fin = run.store.attempts(final["id"])[0]["start"]
        assert all(a["end"] <= fin for a in run.store.attempts() if a["job_id"] != final["id"])
    else:
        assert final["status"] == "UNREADY" and not marker.exists()


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_cancel_detached_run_kills_whole_process_groups(tmp_path: Path, toy_repo: Path, cli) -> None:
    pipeline = {"tasks": {"calibrate": command_task(
        ["visit", "detector"], ["raw"], ["calexp"], "sleep 60 & wait; cp {inputs.raw} {outputs.calexp}")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 2}})
    r = cli("submit", cfg, "--detach")
    assert r.exit_code == 0, r.output
    sd = tmp_path / "submit" / "toy" / "run"
    run = Run(sd)
    _wait(lambda: len(run.store.attempts(status="RUNNING")) == 2)
    pgids = [a["pid"] for a in run.store.attempts(status="RUNNING")]
    r = cli("cancel", sd)
    assert r.exit_code == 0, r.output
    assert run.store.run_info()["status"] == "CANCELLED"
    assert {j["status"] for j in run.store.jobs()} == {JobState.CANCELLED}
    for pg in pgids:  # no orphan: the group (runner, shell, sleep) is gone
        assert group_members(pg) == []
    rep = cli("report", sd, "--json")
    assert rep.exit_code == 1 and json.loads(rep.output)["jobs"]["cancelled"] == 4


def test_cancel_when_orchestrator_is_gone(tmp_path: Path, toy_repo: Path, cli) -> None:
    pipeline = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], "sleep 60")}}
    cfg = write_submit(tmp_path, pipeline, repo=toy_repo, site={"local": {"cores": 1}})
    assert cli("submit", cfg, "--detach").exit_code == 0
    run = Run(tmp_path / "submit" / "toy" / "run")
    _wait(lambda: len(run.store.attempts(status="RUNNING")) == 1)
    orch = run.store.run_info()["orchestrator_pid"]
    os.kill(orch, signal.SIGKILL)
    _wait(lambda: summarize(run)["status"] == "INTERRUPTED")
    pg = run.store.attempts(status="RUNNING")[0]["pid"]
    cancel(LocalService(), run)
    assert run.store.run_info()["status"] == "CANCELLED"
    _wait(lambda: group_members(pg) == [], timeout=5)


def test_one_local_site_serves_two_runs(tmp_path: Path) -> None:
    """A backend is a site, not a run: attempts of two runs side by side, each marked as its run's
    (so one run's orphans are found and killed without touching the other's), each end keyed by it."""
    a, b = tmp_path / "runA", tmp_path / "runB"
    backend = LocalBackend(LocalSettings(cores=2))
    la, lb = (shell_launch(r, 1, 'echo "$BATCHPROD_SUBMIT_DIR"; sleep 30') for r in (a, b))
    ha, hb = backend.start([la, lb])
    _wait(lambda: la.stdout.read_text().splitlines()[-1:] == [str(a)] and lb.stdout.read_text().splitlines()[-1:] == [str(b)])

    LocalService().cleanup_orphans(SimpleNamespace(submit_dir=a), [])  # what a restart of run A does
    ends: list = []
    _wait(lambda: bool(ends.extend(backend.poll()) or ends))
    assert [(e.key, e.signal) for e in ends] == [((str(a), 1, 1), signal.SIGKILL)]
    assert backend.active() == 1 and backend.running_since(hb) is not None  # run B's attempt runs on
    backend.kill(hb, FailureClass.CANCELLED, "cancelled")
    ends.clear()
    _wait(lambda: bool(ends.extend(backend.poll()) or ends))
    assert [(e.key, e.fclass) for e in ends] == [((str(b), 1, 1), FailureClass.CANCELLED)]
    backend.close()
