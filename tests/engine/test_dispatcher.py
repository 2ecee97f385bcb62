"""The dispatcher over several runs and sites, driven in virtual time with the packaged FakeBackend."""

from __future__ import annotations

import json
from pathlib import Path

from batchprod.engine.dag import RunDag
from batchprod.engine.dispatcher import Dispatcher, Site, VirtualClock
from batchprod.engine.prepare import prepare
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.testing import make_toy_repo, write_submit
from batchprod.wms.base import Capacity
from batchprod.wms.fake import FakeBackend, FakeEnd


def _run(tmp_path: Path, name: str, **keys) -> Run:
    repo = make_toy_repo(tmp_path / f"repo-{name}")
    return prepare(write_submit(tmp_path / name, repo=repo, **keys))


def _dag(run: Run, clock: VirtualClock, sites: list[Site]) -> RunDag:
    dag = RunDag(run, host="here", wall=clock.time, mono=clock.monotonic)
    dag.load()
    dag.recover([s.backend for s in sites])
    dag.prepare_queue()
    return dag


def _sites(clock: VirtualClock, n: int, **kw) -> list[Site]:
    return [Site.of(f"s{i}", FakeBackend(clock, name=f"s{i}", capacity=Capacity(cores=1, memory_mb=10_000), **kw))
            for i in range(n)]


def _statuses(run: Run) -> set[str]:
    return {j["status"] for j in run.store.jobs()}


def test_two_runs_on_two_sites_finish_and_no_site_is_ever_over_capacity(tmp_path: Path) -> None:
    clock = VirtualClock()
    t0 = clock.monotonic()
    sites = _sites(clock, 2, duration=10.0)
    runs = [_run(tmp_path, "a"), _run(tmp_path, "b", payload={"outputRun": "b/run"})]
    d = Dispatcher(sites, clock)
    for r in runs:
        d.add(_dag(r, clock, sites))
    results = d.run()
    assert set(results.values()) == {"SUCCEEDED"}
    assert all(_statuses(r) == {"SUCCEEDED"} for r in runs)
    assert all(s.peak["cores"] == 1 and s.peak["jobs"] == 1 for s in sites)  # both used, never over 1
    assert sites[0].backend.started + sites[1].backend.started == 12  # 2 runs x (4 calibrate + 2 coadd)
    # 12 jobs of 10 s on 2 single-core sites: 60 s of virtual time at best, and nothing idles long
    assert 60 <= clock.monotonic() - t0 < 90


def test_an_injected_failure_is_retried_and_its_budget_spent(tmp_path: Path) -> None:
    clock = VirtualClock()
    sites = _sites(clock, 1, duration=1.0,
                   outcome=lambda la: FakeEnd(exit_code=3) if la.name.startswith("calibrate") and la.attempt == 1
                   else None)
    run = _run(tmp_path, "a", numberOfRetries=1)
    d = Dispatcher(sites, clock)
    d.add(_dag(run, clock, sites))
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    job = run.store.job_by_name("calibrate_visit1_detector0")
    assert job["attempts"] == 2 and job["retries"] == 1
    assert [a["failure_class"] for a in run.store.attempts(job["id"])] == ["user_error", None]


def test_an_unavailable_site_keeps_its_attempts_and_the_other_site_takes_new_work(tmp_path: Path) -> None:
    clock = VirtualClock()
    sites = _sites(clock, 2, duration=20.0)
    run = _run(tmp_path, "a", numberOfRetries=0)
    d = Dispatcher(sites, clock)
    d.add(_dag(run, clock, sites))
    d.tick()  # one attempt on each site
    assert sites[0].jobs == sites[1].jobs == 1
    sites[0].backend.unavailable = "squeue: Unable to contact slurm controller"
    t0 = clock.monotonic()
    while clock.monotonic() - t0 < 45:  # down across the end of its attempt (t=20)
        d.tick()
        clock.sleep(1.0)
    assert sites[0].down_reason and "controller" in sites[0].down_reason
    assert sites[0].jobs == 1  # kept, not failed
    assert d.skips[("s0", "down")] > 0 and d.skips[("s1", "capacity")] > 0  # why work went where it did
    sites[0].backend.unavailable = None
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    assert all(a["failure_class"] is None for a in run.store.attempts())
    assert sites[1].backend.started > sites[0].backend.started  # new work went to the site that answered


def test_a_site_refusing_starts_costs_no_budget(tmp_path: Path) -> None:
    clock = VirtualClock()
    sites = _sites(clock, 1, duration=1.0)
    sites[0].backend.unavailable = "sbatch: Unable to contact slurm controller"
    run = _run(tmp_path, "a", numberOfRetries=0)
    d = Dispatcher(sites, clock)
    d.add(_dag(run, clock, sites))
    d.tick()
    assert sites[0].jobs == 0 and sites[0].down_reason
    sites[0].backend.unavailable = None
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    first, second = run.store.attempts(0)
    assert first["failure_class"] == "infrastructure" and "not started" in first["message"]
    assert second["failure_class"] is None and run.store.jobs()[0]["retries"] == 0


def test_walltime_and_preemption_in_virtual_time(tmp_path: Path) -> None:
    clock = VirtualClock()
    sites = _sites(clock, 1, duration=lambda la: 100.0 if la.label == "calibrate" and la.attempt == 1 else 1.0)
    run = _run(tmp_path, "a", requestWalltime=10, numberOfRetries=1)
    d = Dispatcher(sites, clock)
    d.add(_dag(run, clock, sites))
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    a = run.store.attempts(0)
    assert a[0]["failure_class"] == FailureClass.TIMEOUT and 10 <= a[0]["wall_s"] < 15


def test_fake_wms_runs_a_whole_submission_with_real_outputs(tmp_path: Path, cli) -> None:
    repo = make_toy_repo(tmp_path / "repo")
    cfg = write_submit(tmp_path, repo=repo, wmsServiceClass="fake", finalJob={"command": "true"})
    r = cli("submit", cfg)
    assert r.exit_code == 0, r.output
    rep = json.loads(cli("report", "toy/run", "--root", tmp_path / "submit", "--json").output)
    assert rep["wms"] == "fake" and rep["jobs"]["succeeded"] == 7
    assert (repo / "toy" / "run").is_dir() and any((repo / "toy" / "run").rglob("*"))


def test_one_dispatcher_two_runs_on_two_real_local_sites(tmp_path: Path) -> None:
    """Real processes: two local sites of one core in one engine (each reaps only its own children)."""
    from batchprod.testing import command_task
    from batchprod.wms.local.backend import LocalBackend, LocalSettings

    pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "touch {outputs.out}")}}
    runs = [prepare(write_submit(tmp_path / f"run{r}", pipeline,
                                 repo=make_toy_repo(tmp_path / f"repo{r}", visits=range(15), detectors=(0,))))
            for r in range(2)]
    sites = [Site.of(f"local{i}", LocalBackend(LocalSettings(cores=1))) for i in range(2)]
    d = Dispatcher(sites)
    for run in runs:
        dag = RunDag(run, host="here")
        dag.load()
        dag.recover([s.backend for s in sites])
        dag.prepare_queue()
        d.add(dag)
    try:
        assert set(d.run().values()) == {"SUCCEEDED"}
    finally:
        for s in sites:
            s.backend.close()
    assert all(s.peak["cores"] == 1 for s in sites)
    spans = sorted((a["start"], a["end"]) for run in runs for a in run.store.attempts())
    assert len(spans) == 30 and all(len(run.store.outputs()) == 15 for run in runs)
    # from the state store: never more than the two sites' two cores at once
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    at_once = max(sum(d for _, d in edges[: i + 1]) for i in range(len(edges)))
    assert at_once <= 2


def test_a_run_says_when_its_site_does_not_answer_and_waits_for_it(tmp_path: Path) -> None:
    from batchprod.engine.orchestrator import Orchestrator

    clock = VirtualClock()
    t0 = clock.monotonic()
    fake = FakeBackend(clock, duration=5.0, capacity=Capacity(cores=2, memory_mb=10_000))
    fake.unavailable = "squeue: Unable to contact slurm controller"
    run = _run(tmp_path, "a", numberOfRetries=0)
    orch = Orchestrator(run, fake, clock=clock)
    seen: list[str | None] = []

    def tick() -> None:
        if fake.unavailable and clock.monotonic() - t0 > 60:
            seen.append(run.store.run_info()["message"])
            fake.unavailable = None  # the controller is back after a minute

    orch.dispatcher.on_tick = tick
    assert orch.execute() == "SUCCEEDED"
    assert seen and "site 'fake' not answering since" in seen[0] and "controller" in seen[0]
    info = run.store.run_info()
    assert info["message"] is None or "not answering" not in info["message"]
    assert all(a["failure_class"] in (None, "infrastructure") for a in run.store.attempts())
    assert run.store.jobs()[0]["retries"] == 0


def test_an_engine_drives_two_runs_to_the_end_and_locks_each(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pytest

    from batchprod.engine.orchestrator import Engine
    from batchprod.errors import RunError
    from batchprod.graph import Registry

    clock = VirtualClock()
    sites = [Site.of(f"s{i}", FakeBackend(clock, name=f"s{i}", duration=3.0, write_outputs=True,
                                          capacity=Capacity(cores=1, memory_mb=10_000))) for i in range(2)]
    runs = [_run(tmp_path, "a"), _run(tmp_path, "b", payload={"outputRun": "b/run"})]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from batchprod.engine.lock import run_lock\n"
                               f"with run_lock({str(runs[1].submit_dir)!r}, 'b/run'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match="is being driven by pid"):
            Engine(sites, clock).execute(runs)  # refused whole: another engine drives one of them
    finally:
        holder.kill()
        holder.wait()
    assert runs[0].store.run_info()["status"] != "RUNNING"
    results = Engine(sites, clock).execute(runs)
    assert sorted(results.values()) == ["SUCCEEDED", "SUCCEEDED"]
    for run in runs:
        info = run.store.run_info()
        assert info["status"] == "SUCCEEDED" and info["orchestrator_pid"] is None
        assert "6 outputs in the registry" in info["message"] and len(run.store.executions()) == 1
    for repo, out_run in ((tmp_path / "repo-a", "toy/run"), (tmp_path / "repo-b", "b/run")):
        reg = Registry(repo / "registry.db")
        assert len(reg.run_datasets(out_run)) == 6
        reg.close()
    assert {a["site"] for run in runs for a in run.store.attempts()} == {"s0", "s1"}


def test_a_site_drains_before_its_scheduled_downtime_and_says_why_it_was_skipped(tmp_path: Path) -> None:
    from batchprod.testing import command_task

    clock = VirtualClock()
    t0 = clock.time()
    window = (t0 + 100, t0 + 300)
    sites = _sites(clock, 2, duration=30.0)
    sites[0].downtimes = [window]
    pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "true")}}
    run = prepare(write_submit(tmp_path / "a", pipeline, requestWalltime=60,
                               repo=make_toy_repo(tmp_path / "repo", visits=range(20), detectors=(0,))))
    d = Dispatcher(sites, clock)
    d.add(_dag(run, clock, sites))
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    on_s0 = [a for a in run.store.attempts() if a["site"] == "s0"]
    # no attempt was started there whose walltime (60 s) would reach the window
    assert all(a["start"] + 60 <= window[0] or a["start"] >= window[1] for a in on_s0)
    assert any(a["start"] >= window[1] for a in on_s0)  # and it took work again after it
    assert d.skips[("s0", "downtime")] > 0 and ("s1", "downtime") not in d.skips


def test_preemption_on_an_opportunistic_site_spends_no_retry_and_the_next_attempt_goes_elsewhere(
        tmp_path: Path) -> None:
    from batchprod.wms.base import Launch

    clock = VirtualClock()
    dedicated, spare = _sites(clock, 2, duration=10.0)
    # the dedicated site (4 cores) stays 3/4 busy while the spare one is idle again after 2 s: the
    # least-loaded rule alone would send the preempted job back to the spare site
    dedicated.cores = 4
    spare.backend.duration = 2.0
    spare.opportunistic = True
    preempted: list[str] = []

    def on_spare(la: Launch) -> FakeEnd | None:  # the opportunistic site takes its cores back once per job
        if la.attempt == 1:
            preempted.append(la.name)
            return FakeEnd(exit_code=None, signal=9)
        return None

    spare.backend.outcome = on_spare
    run = _run(tmp_path, "a", numberOfRetries=0)
    d = Dispatcher([dedicated, spare], clock)
    d.add(_dag(run, clock, [dedicated, spare]))
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    assert preempted and spare.preempted == len(preempted)
    assert d.skips[("s1", "opportunistic")] >= len(preempted)
    for name in preempted:
        job = run.store.job_by_name(name)
        atts = run.store.attempts(job["id"])
        assert [a["failure_class"] for a in atts] == ["killed", None] and job["retries"] == 0
        assert [a["site"] for a in atts] == ["s1", "s0"]  # then on the dedicated site


def _many(tmp_path: Path, name: str, n: int) -> Run:
    from batchprod.testing import command_task

    pipeline = {"tasks": {"noop": command_task(["visit", "detector"], ["raw"], ["out"], "true")}}
    return prepare(write_submit(tmp_path / name, pipeline, payload={"outputRun": f"{name}/run"},
                                repo=make_toy_repo(tmp_path / f"repo-{name}", visits=range(n), detectors=(0,))))


def test_fair_share_between_runs_of_equal_priority_and_priority_first(tmp_path: Path) -> None:
    clock = VirtualClock()
    (site,) = [Site.of("s", FakeBackend(clock, duration=10.0, capacity=Capacity(cores=8, memory_mb=1 << 20)))]
    a, b, c = _many(tmp_path, "a", 60), _many(tmp_path, "b", 60), _many(tmp_path, "c", 16)
    d = Dispatcher([site], clock)
    dags = [_dag(r, clock, [site]) for r in (a, b, c)]
    dags[0].share, dags[1].share = 3.0, 1.0  # a and b: equal priority, shares 3:1
    dags[2].priority = 10  # c: served before both
    for dag in dags:
        d.add(dag)
    samples: list[tuple[int, int, int]] = []

    def sample() -> None:
        if all(dag.heap for dag in dags[:2]):  # while a and b both have work waiting
            samples.append((len(dags[0].active), len(dags[1].active), len(dags[2].active)))

    d.on_tick = sample
    assert set(d.run().values()) == {"SUCCEEDED"}
    assert samples[0] == (0, 0, 8)  # the high-priority run takes every slot first
    shared = [(x, y) for x, y, z in samples if z == 0]
    ratio = sum(x for x, _ in shared) / sum(y for _, y in shared)
    assert abs(ratio - 3.0) / 3.0 < 0.10, (ratio, shared[:5])


def test_a_job_killed_on_a_dedicated_site_retries_elsewhere_not_there_again(tmp_path: Path) -> None:
    """A site that kills what runs on it (a reaper, a bad node): each killed job's next attempt waits
    for the other site instead of going back to be killed again until its retries run out."""
    from batchprod.wms.base import Launch

    clock = VirtualClock()
    killer, good = _sites(clock, 2, duration=5.0)
    killer.cores = 4  # the bigger, emptier site: least-loaded placement alone would go back there
    killer.backend.capacity = Capacity(cores=4, memory_mb=10_000)
    killed: list[str] = []

    def reaper(la: Launch) -> FakeEnd | None:
        killed.append(la.name)
        return FakeEnd(exit_code=None, signal=9)

    killer.backend.outcome = reaper
    run = _run(tmp_path, "a", numberOfRetries=0)
    d = Dispatcher([killer, good], clock)
    d.add(_dag(run, clock, [killer, good]))
    assert d.run()[str(run.submit_dir)] == "SUCCEEDED"
    assert killed and len(killed) == len(set(killed))  # no job was killed there twice
    for name in killed:
        atts = run.store.attempts(run.store.job_by_name(name)["id"])
        assert [(a["site"], a["failure_class"]) for a in atts] == [("s0", "killed"), ("s1", None)]
    assert d.skips[("s0", "killed-here")] > 0
