"""Campaigns on real processes: two local sites of this machine, a central database (SQLite and
PostgreSQL), the real dispatcher; priorities, fair share, gates, pause, cancel, downtime, preemption."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.testing import Background, Toy, create, runner
from batchprod.state.run import Run
from batchprod.testing import wait_for


def attempts(toy: Toy, name: str) -> list[dict[str, Any]]:
    return Run(toy.root / "submit" / name).store.attempts()


def usage(rows: list[dict[str, Any]], t0: float, t1: float) -> float:
    """Core-seconds of attempts that ran within [t0, t1] (1 core each)."""
    return sum(max(0.0, min(r["end"] or t1, t1) - max(r["start"], t0)) for r in rows if r["start"] is not None)


def test_campaign_runs_steps_in_order_and_reports(central: str, toy: Toy, cli) -> None:
    a, b = toy.config("a"), toy.config("b")
    cat = toy.sites({"big": {"cores": 3}, "small": {"cores": 1}})
    path = toy.campaign("c1", [{"name": "s1", "submit": [a]}, {"name": "s2", "submit": [b]}], priority=5)
    r = cli("campaign", "create", path, "--start")
    assert r.exit_code == 0, r.output
    runner(central, cat).run()
    db = CampaignDB(central)
    assert db.get("c1")["state"] == "done"
    s1, s2 = db.steps(db.get("c1")["id"])
    assert (s1["state"], s2["state"]) == ("done", "done")
    assert s2["started"] >= s1["ended"]  # step 2 after step 1
    first_b = min(x["start"] for x in attempts(toy, "b"))
    assert first_b >= max(x["end"] for x in attempts(toy, "a"))
    for name in ("a", "b"):
        rows = attempts(toy, name)
        assert len(rows) == 16 and all(x["status"] == "SUCCEEDED" for x in rows)  # each job exactly once
        assert {x["site"] for x in rows} <= {"big", "small"}
    r = cli("campaign", "status", "c1")
    assert r.exit_code == 0 and "done" in r.output and "big" in r.output, r.output
    kinds = [(e["kind"], e["subject"], e["state"]) for e in db.events()]
    assert ("step", "c1/s1", "running") in kinds and ("campaign", "c1", "done") in kinds


def test_priority_then_fair_share(central: str, toy: Toy) -> None:
    """On one 4-core site: the high-priority campaign's jobs all start before the low one's; two
    campaigns of equal priority with shares 3:1 get 3:1 of the cores while both have work."""
    cfg = {n: toy.config(n, "sleep 0.4; cat {inputs.raw} > {outputs.calexp}") for n in ("hi", "lo", "x", "y")}
    cat = toy.sites({"only": {"cores": 4}})
    create(central, toy.campaign("hi", [{"name": "s", "submit": [cfg["hi"]]}], priority=10))
    create(central, toy.campaign("lo", [{"name": "s", "submit": [cfg["lo"]]}], priority=0))
    runner(central, cat).run()
    hi, lo = attempts(toy, "hi"), attempts(toy, "lo")
    assert min(x["start"] for x in lo) >= max(x["start"] for x in hi) - 0.05

    create(central, toy.campaign("x", [{"name": "s", "submit": [cfg["x"]]}], priority=1, share=3))
    create(central, toy.campaign("y", [{"name": "s", "submit": [cfg["y"]]}], priority=1, share=1))
    runner(central, cat).run()
    x, y = attempts(toy, "x"), attempts(toy, "y")
    t0 = max(min(r["start"] for r in x), min(r["start"] for r in y))
    t1 = min(max(r["start"] for r in x), max(r["start"] for r in y))  # both still had work to start
    ux, uy = usage(x, t0, t1), usage(y, t0, t1)
    assert ux / (ux + uy) == pytest.approx(0.75, abs=0.075), (ux, uy)  # within 10 % of the target


def test_gate_pause_resume_and_reprioritize(central: str, toy: Toy, cli) -> None:
    a, b = toy.config("a", "sleep 0.3; cat {inputs.raw} > {outputs.calexp}"), toy.config("b")
    cat = toy.sites({"one": {"cores": 2}})
    create(central, toy.campaign("g", [{"name": "first", "submit": [a]}, {"name": "qa", "gate": True, "submit": [b]}]))
    db = CampaignDB(central)
    bg = Background(runner(central, cat))
    try:
        wait_for(lambda: db.steps(db.get("g")["id"])[0]["state"] == "running", timeout=30)
        assert cli("campaign", "pause", "g").exit_code == 0
        time.sleep(0.5)  # a control round: nothing new starts from now on
        paused_at = time.time()
        n = len(attempts(toy, "a"))
        time.sleep(1.0)
        assert len(attempts(toy, "a")) == n  # no new attempt while paused (running ones finished)
        r = cli("campaign", "pause", "g")
        assert r.exit_code == 2 and "cannot pause" in r.output  # one line, not a traceback
        assert cli("campaign", "reprioritize", "g", "7", "--share", "2").exit_code == 0
        for bad in (["--share", "nan"], ["--share", "inf"], ["--share", "0"], ["99999999999999999999"]):
            args = ["campaign", "reprioritize", "g", *(["7", *bad] if bad[0].startswith("--") else bad)]
            r = cli(*args)
            assert r.exit_code == 2 and "Traceback" not in r.output, (bad, r.output)
        assert cli("campaign", "resume", "g").exit_code == 0
        wait_for(lambda: db.steps(db.get("g")["id"])[0]["state"] == "done", timeout=60)
        time.sleep(0.5)
        assert db.steps(db.get("g")["id"])[1]["state"] == "gated"  # waits for the operator
        assert not (toy.root / "submit" / "b").exists()
        assert cli("campaign", "gate", "release", "g", "qa").exit_code == 0
        wait_for(lambda: db.get("g")["state"] == "done", timeout=60)
    finally:
        bg.stop()
    assert all(x["status"] == "SUCCEEDED" for x in attempts(toy, "b"))
    assert paused_at > 0 and db.get("g")["priority"] == 7 and db.get("g")["share"] == 2
    r = cli("campaign", "gate", "release", "g", "qa")
    assert r.exit_code == 2 and "not gated" in r.output


def test_cancel_stops_running_jobs(central: str, toy: Toy, cli) -> None:
    a = toy.config("a", "sleep 30; cat {inputs.raw} > {outputs.calexp}")
    cat = toy.sites({"one": {"cores": 2}})
    create(central, toy.campaign("k", [{"name": "s", "submit": [a]}, {"name": "t", "submit": [toy.config("b")]}]))
    db = CampaignDB(central)
    bg = Background(runner(central, cat), forever=False)
    try:
        wait_for(lambda: (toy.root / "submit" / "a").exists()
                 and any(x["status"] == "RUNNING" for x in attempts(toy, "a")), timeout=30)
        t = time.monotonic()
        assert cli("campaign", "cancel", "k").exit_code == 0
        bg.thread.join(30)
        assert time.monotonic() - t < 15  # killed, not waited for
    finally:
        bg.stop()
    assert db.get("k")["state"] == "cancelled"
    assert [s["state"] for s in db.steps(db.get("k")["id"])] == ["cancelled", "cancelled"]
    assert Run(toy.root / "submit" / "a").store.run_info()["status"] == "CANCELLED"
    assert not (toy.root / "submit" / "b").exists()


def test_scheduled_downtime_is_never_crossed(central: str, toy: Toy) -> None:
    start = datetime.now(UTC) + timedelta(seconds=4)
    end = start + timedelta(seconds=3)
    a = toy.config("a", "sleep 0.5; cat {inputs.raw} > {outputs.calexp}", requestWalltime=2)
    cat = toy.sites({"closing": {"cores": 2, "downtimes": [{"start": start.isoformat(), "end": end.isoformat(),
                                                            "reason": "maintenance"}]},
                     "open": {"cores": 1}})
    create(central, toy.campaign("d", [{"name": "s", "submit": [a]}]))
    runner(central, cat).run()
    rows = attempts(toy, "a")
    assert all(x["status"] == "SUCCEEDED" for x in rows) and len(rows) == 16
    w0, w1 = start.timestamp(), end.timestamp()
    on_closing = [x for x in rows if x["site"] == "closing"]
    assert on_closing, "the closing site took work before its window"
    for x in on_closing:
        assert x["start"] + 2 <= w0 + 0.5 or x["start"] >= w1  # never placed to run into the window


def test_preemption_on_an_opportunistic_site_spends_no_retries(central: str, tmp_path: Path) -> None:
    """Kills from outside on an opportunistic site are retried without spending the budget (none is
    given here), and the next attempt goes to the dedicated site, which has room for it."""
    toy = Toy(tmp_path / "p", visits=2)  # 8 jobs: the dedicated site never fills up
    a = toy.config("a", "sleep 1.5; cat {inputs.raw} > {outputs.calexp}", numberOfRetries=0)
    cat = toy.sites({"opp": {"cores": 2, "opportunistic": True}, "ded": {"cores": 8}})
    create(central, toy.campaign("p", [{"name": "s", "submit": [a]}]))
    killed: set[int] = set()
    stop = threading.Event()

    def reaper() -> None:  # the resource owner takes its nodes back: SIGKILL from outside
        while not stop.is_set():
            d = toy.root / "submit" / "a"
            if d.exists():
                try:
                    rows = attempts(toy, "a")
                except Exception:  # noqa: BLE001 (the run is being created)
                    rows = []
                for x in rows:
                    if x["site"] == "opp" and x["status"] == "RUNNING" and x["pid"] and x["job_id"] not in killed:
                        time.sleep(0.3)
                        try:
                            os.killpg(x["pid"], signal.SIGKILL)
                            killed.add(x["job_id"])
                        except ProcessLookupError:
                            pass
            time.sleep(0.05)

    t = threading.Thread(target=reaper, daemon=True)
    t.start()
    try:
        runner(central, cat).run()
    finally:
        stop.set()
        t.join(5)
    run = Run(toy.root / "submit" / "a")
    jobs = {j["id"]: j for j in run.store.jobs()}
    assert killed and all(j["status"] == "SUCCEEDED" for j in jobs.values())  # numberOfRetries: 0, yet done
    for j in killed:
        assert jobs[j]["preemptions"] >= 1 and jobs[j]["retries"] == 0
        last = max((x for x in run.store.attempts(j)), key=lambda x: x["number"])
        assert last["site"] == "ded"  # after a preemption: the dedicated site
    sites = CampaignDB(central).site_states()
    assert sites["opp"]["stats"]["preempted"] >= len(killed) and sites["opp"]["state"] == "online"


def test_a_stopped_dispatcher_leaves_campaigns_running_and_the_next_one_resumes(central: str, toy: Toy) -> None:
    a = toy.config("a", "sleep 0.5; cat {inputs.raw} > {outputs.calexp}")
    cat = toy.sites({"one": {"cores": 2}})
    create(central, toy.campaign("r", [{"name": "s", "submit": [a]}, {"name": "t", "submit": [toy.config("b")]}]))
    db = CampaignDB(central)
    bg = Background(runner(central, cat))
    wait_for(lambda: (toy.root / "submit" / "a").exists()
             and sum(x["status"] == "SUCCEEDED" for x in attempts(toy, "a")) >= 3, timeout=60)
    bg.stop()  # Ctrl-C: attempts stopped, the campaign kept
    assert db.get("r")["state"] == "running"
    assert Run(toy.root / "submit" / "a").store.run_info()["status"] == "INTERRUPTED"
    runner(central, cat).run()
    assert db.get("r")["state"] == "done"
    for name in ("a", "b"):
        run = Run(toy.root / "submit" / name)
        assert all(j["status"] == "SUCCEEDED" for j in run.store.jobs())
        outs = run.store.outputs()
        assert len(outs) == 16 and len({o["path"] for o in outs}) == 16
