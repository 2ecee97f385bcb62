"""Site health on evidence: the state machine alone, then the dispatcher acting on it (a site that stops
answering is declared down, its work re-dispatched, probed, and brought back), in virtual time with
the packaged FakeBackend."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchprod.engine.dag import RunDag
from batchprod.engine.dispatcher import Dispatcher, Site, VirtualClock
from batchprod.engine.health import Health, HealthPolicy, SiteState
from batchprod.engine.prepare import prepare
from batchprod.execution.states import FailureClass
from batchprod.testing import make_toy_repo, write_submit
from batchprod.wms.base import Capacity
from batchprod.wms.fake import FakeBackend

P = HealthPolicy(unanswered_for=10, submit_failures=3, lost_jobs=3, window=10, min_samples=5, degrade_rate=0.3,
                 down_rate=0.7, probe_after=60, probe_max=200, drain_horizon=100)


def test_unanswered_then_down_then_probing_then_online() -> None:
    h = Health(P)
    h.unanswered(0.0, "sbatch: Unable to contact slurm controller")
    h.evaluate(9.0, None, None)
    assert h.state == SiteState.ONLINE  # a blip is not an outage
    h.evaluate(10.5, None, None)
    assert h.state == SiteState.DOWN and "not answering for 10 s" in h.evidence and "Unable to contact" in h.evidence
    h.evaluate(70.0, None, None)
    assert h.state == SiteState.DOWN
    h.evaluate(70.6, None, None)
    assert h.state == SiteState.PROBING
    h.ended(FailureClass.INFRASTRUCTURE, "stage-in failed", False, 71.0)  # the probe fails
    assert h.state == SiteState.DOWN and "probe failed" in h.evidence
    h.evaluate(71.0 + 119, None, None)
    assert h.state == SiteState.DOWN  # back-off doubled: 120 s
    h.evaluate(71.0 + 121, None, None)
    assert h.state == SiteState.PROBING
    h.ended(None, None, False, 200.0)
    assert h.state == SiteState.ONLINE and h.evidence == "probe job succeeded"


def test_submissions_vanished_jobs_and_failure_rate() -> None:
    h = Health(P)
    for t in range(3):
        h.submitted(False, t, "sbatch refused")
    h.evaluate(3, None, None)
    assert h.state == SiteState.DOWN and "3 submissions in a row failed" in h.evidence

    h = Health(P)
    for t in range(3):
        h.ended(FailureClass.KILLED, "vanished from squeue", False, t)
    h.evaluate(3, None, None)
    assert h.state == SiteState.DOWN and "vanished" in h.evidence

    h = Health(P)
    for t in range(10):  # payload errors say nothing of the site
        h.ended(FailureClass.USER_ERROR, "exit 3", False, t)
    for t in range(10):  # kills on an opportunistic site are preemptions, not faults
        h.ended(FailureClass.KILLED, "SIGKILL", True, t)
    h.evaluate(20, None, None)
    assert h.state == SiteState.ONLINE and h.fault_rate() == 0
    for t in range(6):
        h.ended(None, None, False, t)
    for t in range(4):
        h.ended(FailureClass.INFRASTRUCTURE, "stage-out: disk full", False, t)
    h.evaluate(30, None, None)
    assert h.state == SiteState.DEGRADED and h.weight() < 1
    for t in range(10):
        h.ended(None, None, False, t)
    h.evaluate(40, None, None)
    assert h.state == SiteState.ONLINE and "back to 0%" in h.evidence


def test_the_only_site_taking_work_is_degraded_not_down_by_its_jobs_failures() -> None:
    """Taking the last site away sends its work nowhere: failures of its attempts degrade it; silence
    and refused submissions still take it down (nothing can run there then)."""
    h = Health(P)
    for t in range(10):
        h.ended(FailureClass.KILLED, "killed by SIGKILL", False, t)
    h.evaluate(10, None, None, alone=True)
    assert h.state == SiteState.DEGRADED and "the only site taking work" in h.evidence and h.takes_work()
    h.evaluate(11, None, None, alone=False)  # another site is up again: the same evidence takes it down
    assert h.state == SiteState.DOWN
    h = Health(P)
    for t in range(3):
        h.submitted(False, t, "sbatch refused")
    h.evaluate(3, None, None, alone=True)
    assert h.state == SiteState.DOWN


def test_scheduled_downtime_drains_then_down_then_online_without_probing() -> None:
    h = Health(P)
    h.evaluate(0, None, "at 2026-12-01T08:00")
    assert h.state == SiteState.DRAINING
    h.evaluate(50, "until 2026-12-01T12:00", None)
    assert h.state == SiteState.DOWN and h.scheduled and "scheduled downtime" in h.evidence
    h.evaluate(60, None, None)
    assert h.state == SiteState.ONLINE and not h.scheduled


def _dag(tmp_path: Path, clock: VirtualClock, sites: list[Site], name: str = "a") -> RunDag:
    repo = make_toy_repo(tmp_path / f"repo-{name}", visits=range(1, 9), detectors=range(4))
    run = prepare(write_submit(tmp_path / name, repo=repo, numberOfRetries=0))
    dag = RunDag(run, host="here", wall=clock.time, mono=clock.monotonic)
    dag.load()
    dag.recover([s.backend for s in sites])
    dag.prepare_queue()
    dag.on_site_down = "redispatch"
    return dag


def test_a_site_that_stops_answering_is_declared_down_its_work_moves_and_it_is_probed_back(tmp_path: Path) -> None:
    clock = VirtualClock()
    sites = [Site.of(n, FakeBackend(clock, duration=30.0, name=n, capacity=Capacity(cores=4, memory_mb=10**6)))
             for n in ("flaky", "steady")]
    flaky, steady = sites
    d = Dispatcher(sites, clock, policy=HealthPolicy(unanswered_for=20, probe_after=50))
    dag = _dag(tmp_path, clock, sites)
    d.add(dag)
    states: list[tuple[str, str]] = []
    d.on_state = lambda s: states.append((s.name, s.health.state.value))
    t0 = clock.now

    def tick_until(pred, limit: float = 10_000) -> None:  # noqa: ANN001
        while not pred() and clock.now - t0 < limit:
            if not d.tick():
                d.wait()

    tick_until(lambda: flaky.jobs == 4)
    stranded = {j: a.attempt for j, a in dag.active.items() if a.site == "flaky"}
    flaky.backend.unavailable = "controller gone"  # its scheduler stops answering
    tick_until(lambda: flaky.health.state == SiteState.DOWN)
    assert clock.now - t0 >= 20 and "controller gone" in flaky.health.evidence
    assert flaky.jobs == 0  # its attempts were taken back: budget kept, ready for the other site
    for j, n in stranded.items():
        assert dag.status[j].value in ("READY", "QUEUED", "RUNNING") and dag.attempts[j] >= n
    flaky.backend.unavailable = None  # it comes back, but the dispatcher does not know yet
    tick_until(lambda: flaky.health.state == SiteState.PROBING)
    assert flaky.jobs <= 1
    tick_until(lambda: flaky.health.state == SiteState.ONLINE)
    assert flaky.peak["jobs"] == 4 and "probe job succeeded" in flaky.health.evidence
    results = d.run()
    assert set(results.values()) == {"SUCCEEDED"}
    assert [s for s in states if s[0] == "flaky"] == [("flaky", "down"), ("flaky", "probing"), ("flaky", "online")]
    jobs = dag.run.store.jobs()
    assert all(j["status"] == "SUCCEEDED" and j["retries"] == 0 for j in jobs)
    # the stranded attempts reported late (the backend still knew them): ignored, not counted twice
    assert len(dag.run.store.outputs()) == len({o["path"] for o in dag.run.store.outputs()})


def test_placement_weights_follow_queues_and_faults(tmp_path: Path) -> None:
    """A site whose attempts sit in its queue, or whose recent ends were its own fault, weighs less in
    placement (its load is divided by its weight)."""
    clock = VirtualClock()
    slow, fast = (Site.of(n, FakeBackend(clock, duration=30.0, name=n, queue_time=q,
                                         capacity=Capacity(cores=20, memory_mb=10**6)))
                  for n, q in (("slow", 1000.0), ("fast", 0.0)))
    d = Dispatcher([slow, fast], clock)
    d.add(_dag(tmp_path, clock, [slow, fast]))
    d.tick()
    clock.sleep(1.0)
    assert slow.backend.queued() == slow.jobs > 0 and fast.backend.queued() == 0
    d.assign()
    assert d._weight[0] == pytest.approx(0.1) and d._weight[1] == 1.0  # its queue does not move
    fast.health.recent.extend([True] * 5 + [False] * 5)  # half of its recent ends were its fault
    fast.health.faults = 5
    d.assign()
    assert d._weight[1] == pytest.approx(0.5)
