"""A Slurm site on the real dev cluster: it serves attempts of several runs, and a controller that does
not answer is SiteUnavailable (from poll, start and cleanup), never an empty poll."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from batchprod.execution.states import FailureClass
from batchprod.testing import dead_slurm_conf, drain_ends, shell_launch, use_slurm, wait_for
from batchprod.wms import slurm as slurm_mod
from batchprod.wms.base import SiteUnavailable
from batchprod.wms.slurm import VANISHED_AFTER, SlurmBackend, SlurmSettings, run_prefix


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> str:
    return use_slurm(monkeypatch)


@pytest.fixture
def dead(tmp_path: Path) -> str:
    return dead_slurm_conf(tmp_path)


def site(**keys) -> SlurmBackend:
    return SlurmBackend(SlurmSettings(pollInterval=0, **keys).for_site("hpc"))


def test_one_site_serves_two_runs(tmp_path: Path, live: str) -> None:
    """Launches of two runs on one backend: each job knows its run (environment, job-name prefix),
    each end carries its run, and cleaning up one run's orphans leaves the other's jobs alone."""
    a, b = tmp_path / "runA", tmp_path / "runB"
    backend = site()
    la, lb = shell_launch(a, 1, 'echo "$BATCHPROD_SUBMIT_DIR"; sleep 30'), shell_launch(b, 1, 'echo "$BATCHPROD_SUBMIT_DIR"; sleep 30')
    ha, hb = backend.start([la, lb])
    names = subprocess.run(["squeue", "-h", "-j", f"{ha},{hb}", "-o", "%i %j"], capture_output=True, text=True,
                           check=True).stdout
    assert f"{ha} {run_prefix(str(a))}.calibrate_visit1" in names and f"{hb} {run_prefix(str(b))}." in names
    wait_for(lambda: la.stdout.exists() and str(a) in la.stdout.read_text(), timeout=60, interval=0.2)
    wait_for(lambda: lb.stdout.exists() and str(b) in lb.stdout.read_text(), timeout=60, interval=0.2)

    SlurmBackend(SlurmSettings()).cleanup_orphans(SimpleNamespace(submit_dir=a), [])  # a restart of run A
    (ended,) = drain_ends(backend, 1, interval=0.2)
    assert ended.key == (str(a), 1, 1) and ended.fclass == FailureClass.KILLED  # cancelled outside this backend
    assert backend.active() == 1 and not backend.poll()  # run B's job runs on
    backend.kill(hb, FailureClass.CANCELLED, "cancelled")
    (ended,) = drain_ends(backend, 1, interval=0.2)
    assert ended.key == (str(b), 1, 1) and ended.fclass == FailureClass.CANCELLED


def test_a_dead_controller_is_unavailable_not_idle(tmp_path: Path, live: str, dead: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    backend = site()
    first = shell_launch(tmp_path / "run", 1, "sleep 30")
    (handle,) = backend.start([first])

    monkeypatch.setenv("SLURM_CONF", dead)  # the controller goes away
    for _ in range(2):
        with pytest.raises(SiteUnavailable, match=r"site 'hpc' unavailable: .*[Uu]nable to contact") as info:
            backend.poll()
        assert info.value.site == "hpc"
    assert backend.active() == 1  # still known: nothing lost, nothing vanished
    with pytest.raises(SiteUnavailable):  # a batch that cannot start does not start at all
        backend.start([shell_launch(tmp_path / "run", 2)])
    assert backend.active() == 1 and list(backend.subs) == [handle]
    with pytest.raises(SiteUnavailable):  # cannot promise that nothing of the run still runs
        backend.cleanup_orphans(SimpleNamespace(submit_dir=tmp_path / "run"), [handle])

    monkeypatch.setenv("SLURM_CONF", live)  # back
    assert backend.poll() == [] and backend.active() == 1
    backend.kill(handle, FailureClass.CANCELLED, "cancelled")
    (ended,) = drain_ends(backend, 1, interval=0.2)
    assert ended.key == first.key and ended.fclass == FailureClass.CANCELLED


def test_jobs_that_vanish_while_the_controller_answers_end_as_killed(tmp_path: Path, live: str) -> None:
    backend = site()
    gone = shell_launch(tmp_path / "run", 1)
    backend.subs["99999999"] = slurm_mod._Sub(gone)  # an id the controller does not know (any more)
    ends = [e for _ in range(VANISHED_AFTER) for e in backend.poll()]
    assert [(e.key, e.fclass) for e in ends] == [(gone.key, FailureClass.KILLED)]
    assert "vanished" in (ends[0].reason or "")


def test_controller_lost_in_the_middle_of_a_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submitted jobs keep their ids; the launch that met the dead controller and those after it end
    as infrastructure (retried later, budget kept), so no submitted job is unknown."""
    calls: list[list[str]] = []

    def fake(args: list[str], what: str, input_text: str | None = None, timeout: float = 120.0) -> str:
        calls.append(args)
        if args[0] == "squeue":
            return "4001|RUNNING|None|0|node1\n"
        if len([c for c in calls if c[0] == "sbatch"]) == 1:
            return "4001\n"
        raise slurm_mod._SiteDown("sbatch: Batch job submission failed: Unable to contact slurm controller")

    monkeypatch.setattr(slurm_mod, "_run_cmd", fake)
    backend = site()
    launches = [shell_launch(tmp_path / "run", j) for j in (1, 2, 3)]
    assert backend.start(launches) == ["4001", "-", "-"]
    assert sum(c[0] == "sbatch" for c in calls) == 2  # no sbatch after the controller was found gone
    ends = backend.poll()
    assert [(e.key, e.fclass) for e in ends] == [(launches[1].key, FailureClass.INFRASTRUCTURE),
                                                 (launches[2].key, FailureClass.INFRASTRUCTURE)]
    assert all("site 'hpc' unavailable" in (e.reason or "") for e in ends)
    assert list(backend.subs) == ["4001"]

    calls.clear()
    fresh = site()
    monkeypatch.setattr(slurm_mod, "_run_cmd", lambda *a, **k: (_ for _ in ()).throw(
        slurm_mod._SiteDown("sbatch: Unable to contact slurm controller")))
    with pytest.raises(SiteUnavailable):
        fresh.start([shell_launch(tmp_path / "run2", j) for j in (1, 2)])
    assert fresh.active() == 0 and fresh.poll() == []


def test_a_refused_submission_is_submit_refused_naming_the_site(tmp_path: Path, live: str) -> None:
    """The controller answers but refuses (a bad partition): SubmitRefused, a RunError (a lone run
    stops with one line) that a dispatcher with other sites holds against this one."""
    from batchprod.errors import RunError
    from batchprod.wms.base import SubmitRefused

    backend = site(partition="nosuchpartition")
    with pytest.raises(SubmitRefused, match=r"^site 'hpc': submission refused: sbatch .*partition") as info:
        backend.start([shell_launch(tmp_path / "run", 1, "true")])
    assert isinstance(info.value, RunError) and backend.active() == 0
