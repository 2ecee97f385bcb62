"""What ``batchprod campaign status`` shows: per step and per site, jobs done / running / queued /
failed, throughput over the last window and an ETA; the campaign's state, priority and message.

A handful of GROUP BY queries over the campaign's runs (never one per job): it stays well under a
second for 10^6 jobs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from batchprod.campaign.db import CampaignDB
from batchprod.execution.states import JobState
from batchprod.state.store import attempt_t, job_t, run_t

WINDOW = 600.0  # seconds of history the throughput is measured over

_BUCKET = {
    JobState.SUCCEEDED.value: "done", JobState.RUNNING.value: "running", JobState.QUEUED.value: "queued",
    JobState.READY.value: "waiting", JobState.PENDING.value: "waiting", JobState.FAILED.value: "failed",
    JobState.UNREADY.value: "failed", JobState.CANCELLED.value: "cancelled", JobState.HELD.value: "waiting",
    JobState.KILLED.value: "failed",
}
COLUMNS = ("done", "running", "queued", "waiting", "failed", "cancelled")


def _blank() -> dict[str, Any]:
    return dict.fromkeys(COLUMNS, 0)


def campaign_status(db: CampaignDB, name: str, now: float | None = None) -> dict[str, Any]:
    now = now or time.time()
    c = db.get(name)
    steps = db.steps(c["id"])
    runs = db.runs(c["id"])
    dirs = [r["submit_dir"] for r in runs if r["submit_dir"]]
    with db.engine.connect() as conn:
        ids = dict(conn.execute(sa.select(run_t.c.submit_dir, run_t.c.id).where(run_t.c.submit_dir.in_(dirs))).all()) \
            if dirs else {}
        rid = list(ids.values())
        jobs = conn.execute(sa.select(job_t.c.run_id, job_t.c.status, sa.func.count())
                            .where(job_t.c.run_id.in_(rid)).group_by(job_t.c.run_id, job_t.c.status)).all() if rid else []
        a = attempt_t.c
        active = conn.execute(sa.select(a.site, a.status, sa.func.count()).where(
            a.run_id.in_(rid), a.status.in_([JobState.QUEUED.value, JobState.RUNNING.value]))
            .group_by(a.site, a.status)).all() if rid else []
        ended = conn.execute(sa.select(a.site, a.status, sa.func.count()).where(
            a.run_id.in_(rid), a.status.in_([JobState.SUCCEEDED.value, JobState.FAILED.value]))
            .group_by(a.site, a.status)).all() if rid else []
        # throughput over the last WINDOW seconds, or since the step started if that is more recent
        recent = conn.execute(sa.select(a.run_id, a.site, sa.func.count()).where(
            a.run_id.in_(rid), a.status == JobState.SUCCEEDED.value, a.end >= now - WINDOW)
            .group_by(a.run_id, a.site)).all() if rid else []
    per_run: dict[int, dict[str, Any]] = defaultdict(_blank)
    for run_id, status, n in jobs:
        per_run[run_id][_BUCKET.get(status, "waiting")] += n
    rate_run: dict[int, float] = defaultdict(float)
    sites: dict[str, dict[str, Any]] = defaultdict(lambda: {**_blank(), "rate_per_h": 0.0})
    since = {ids[r["submit_dir"]]: next(s["started"] for s in steps if s["id"] == r["step_id"])
             for r in runs if r["submit_dir"] in ids}
    for run_id, site, n in recent:
        window = max(1.0, min(WINDOW, now - (since.get(run_id) or now - WINDOW)))
        rate_run[run_id] += n / window
        sites[site or "?"]["rate_per_h"] += n / window * 3600
    for site, status, n in active:
        sites[site or "?"]["running" if status == JobState.RUNNING.value else "queued"] += n
    for site, status, n in ended:
        sites[site or "?"]["done" if status == JobState.SUCCEEDED.value else "failed"] += n
    out_steps = []
    for st in steps:
        mine = [r for r in runs if r["step_id"] == st["id"]]
        tot = _blank()
        rate = 0.0
        for r in mine:
            i = ids.get(r["submit_dir"])
            if i is None:
                continue
            for k, v in per_run[i].items():
                tot[k] += v
            rate += rate_run[i]
        total = sum(tot.values())
        left = total - tot["done"] - tot["failed"] - tot["cancelled"]
        eta = left / rate if rate > 0 and left > 0 else None
        out_steps.append({
            "step": st["name"], "state": st["state"], "runs": len(mine), "jobs": total, **tot,
            "rate_per_h": round(rate * 3600, 1), "eta_s": round(eta) if eta is not None else None,
            "message": st["message"],
        })
    return {
        "campaign": c["name"], "owner": c["owner"], "state": c["state"], "priority": c["priority"],
        "share": c["share"], "message": c["message"], "steps": out_steps,
        "sites": [{"site": k, **v, "rate_per_h": round(v["rate_per_h"], 1)} for k, v in sorted(sites.items())],
        "site_states": {k: {"state": v["state"], "evidence": v["evidence"]} for k, v in db.site_states().items()},
        "runs": [{"step": next(s["name"] for s in steps if s["id"] == r["step_id"]), "config": r["config"],
                  "submit_dir": r["submit_dir"], "state": r["state"], "message": r["message"]} for r in runs],
    }
