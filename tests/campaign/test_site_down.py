"""A Slurm site and a local site in one campaign; the Slurm controller goes away mid-run. The site is
declared down on evidence (no answer for the configured time), its work in flight is re-dispatched to
the local site, the campaign finishes with every job exactly once, and the attempts left running on
Slurm (zombies: the cluster itself is fine) never publish over their replacements."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.testing import Background, Toy, create, runner
from batchprod.engine.health import HealthPolicy
from batchprod.state.run import Run
from batchprod.testing import dead_slurm_conf, use_slurm, wait_for


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> str:
    return use_slurm(monkeypatch)


def test_slurm_site_lost_mid_run_work_finishes_on_the_local_site(central: str, tmp_path: Path, slurm: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    toy = Toy(tmp_path / "t", visits=3)  # 12 jobs
    a = toy.config("a", "sleep 4; cat {inputs.raw} > {outputs.calexp}")
    cat = toy.sites({"hpc": {"wmsServiceClass": "slurm", "pollInterval": 0.2, "maxJobs": 4},
                     "laptop": {"cores": 2}})
    create(central, toy.campaign("lost", [{"name": "s", "submit": [a]}], onSiteDown="redispatch"))
    db = CampaignDB(central)
    bg = Background(runner(central, cat, policy=HealthPolicy(unanswered_for=2.0, probe_after=3600.0)), forever=False)
    sub = toy.root / "submit" / "a"
    try:
        def on_hpc() -> list[dict]:
            return [x for x in Run(sub).store.attempts() if x["site"] == "hpc" and x["status"] == "RUNNING"] \
                if (sub / "state-db.json").exists() or (sub / "state.db").exists() else []

        wait_for(lambda: len(on_hpc()) >= 2, timeout=90, interval=0.2)
        stranded = {(x["job_id"], x["number"]): x for x in on_hpc()}
        monkeypatch.setenv("SLURM_CONF", dead_slurm_conf(tmp_path))  # the controller goes away
        wait_for(lambda: db.site_states().get("hpc", {}).get("state") == "down", timeout=60, interval=0.2)
        bg.thread.join(180)
    finally:
        bg.stop()
        monkeypatch.setenv("SLURM_CONF", slurm)
    assert db.get("lost")["state"] == "done"
    run = Run(sub)
    jobs = run.store.jobs()
    assert len(jobs) == 12 and all(j["status"] == "SUCCEEDED" for j in jobs)
    outs = run.store.outputs()
    assert len(outs) == 12 and len({o["path"] for o in outs}) == 12  # each output once
    hpc = db.site_states()["hpc"]
    assert hpc["state"] == "down" and "not answering" in hpc["evidence"]
    for (job, number) in stranded:
        rows = run.store.attempts(job)
        mine = next(r for r in rows if r["number"] == number)
        assert mine["status"] == "FAILED" and "re-dispatched" in (mine["message"] or "")
        assert max(r["number"] for r in rows) > number  # a replacement ran
        assert mine["failure_class"] == "infrastructure"
        assert next(j for j in jobs if j["id"] == job)["retries"] == 0  # budget kept
    incidents = db.incidents(state="open")
    assert any(i["kind"] == "site_down" and i["site"] == "hpc" for i in incidents)

    # the stranded attempts kept running on the (healthy) cluster: let them end, then check that none
    # published (the replacements fenced them off) and the registry holds the replacements' outputs
    handles = [x["handle"] for x in stranded.values()]
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(handles)], capture_output=True,
                                        text=True).stdout.strip(), timeout=90, interval=0.5)
    for (job, number), x in stranded.items():
        result = Path(x["stdout"].removesuffix(".out") + ".result.json")
        assert not result.exists(), f"zombie attempt {number} of job {job} published"
    again = Run(sub).store.outputs()
    assert sorted((o["path"], o["checksum"]) for o in again) == sorted((o["path"], o["checksum"]) for o in outs)


def test_a_slurm_site_that_refuses_every_submission_is_down_and_the_work_runs_elsewhere(
        central: str, tmp_path: Path, slurm: str) -> None:
    """A bad partition: sbatch is refused at once. Among several sites that is evidence against the
    site (submissions fail repeatedly), not the end of the dispatcher and of every campaign."""
    toy = Toy(tmp_path / "t", visits=2)  # 8 jobs
    a = toy.config("a", "cat {inputs.raw} > {outputs.calexp}")
    cat = toy.sites({"hpc": {"wmsServiceClass": "slurm", "pollInterval": 0.2, "partition": "nosuchpartition"},
                     "laptop": {"cores": 2}})
    create(central, toy.campaign("refused", [{"name": "s", "submit": [a]}]))
    db = CampaignDB(central)
    bg = Background(runner(central, cat, policy=HealthPolicy(probe_after=3600.0)), forever=False)
    try:
        bg.thread.join(120)
    finally:
        bg.stop()
    assert db.get("refused")["state"] == "done"
    run = Run(toy.root / "submit" / "a")
    jobs = run.store.jobs()
    assert len(jobs) == 8 and all(j["status"] == "SUCCEEDED" for j in jobs)
    assert all(j["retries"] == 0 for j in jobs)  # a refused submission spends no retry
    assert {x["site"] for x in run.store.attempts() if x["status"] == "SUCCEEDED"} == {"laptop"}
    hpc = db.site_states()["hpc"]
    assert hpc["state"] == "down" and "submissions in a row failed" in hpc["evidence"]
    assert "partition" in hpc["evidence"].lower()
