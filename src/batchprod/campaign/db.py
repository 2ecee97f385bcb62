"""Campaigns, their steps and runs, site states, operator events and incidents in the central database.

The same database as the runs (``--db URL`` / ``$BATCHPROD_DB``; SQLite file or PostgreSQL), schema
revision 0004. The operator's commands (``campaign start|pause|...``) write here; the dispatcher
(``campaign run``) reads it once per control interval and writes what it decides, so commands and
dispatcher may be different processes on different hosts. Every state change is also one row of
``ops_event`` (the JSON-lines event log is written from the same calls, see :mod:`events`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from batchprod.campaign.sites import _did_you_mean
from batchprod.campaign.spec import CampaignSpec, dump
from batchprod.errors import RunError
from batchprod.state.database import selected_db
from batchprod.state.store import (
    StateStore,
    campaign_run_t,
    campaign_t,
    incident_t,
    ops_event_t,
    site_state_t,
    step_t,
)

#: campaign states; the last three are final
PLANNED, RUNNING, PAUSED, DONE, FAILED, CANCELLED = "planned", "running", "paused", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
#: step states
WAITING, GATED = "waiting", "gated"
#: a campaign run that could not be prepared (its config, its output run, ...)
NOT_PREPARED = "not prepared"

#: operator command -> (states it applies to, the state it leads to)
TRANSITIONS = {
    "start": ((PLANNED,), RUNNING),
    "pause": ((RUNNING,), PAUSED),
    "resume": ((PAUSED,), RUNNING),
    "cancel": ((PLANNED, RUNNING, PAUSED), CANCELLED),
}


def default_db() -> str:
    """The central database: ``--db`` / ``$BATCHPROD_DB``, else ``$XDG_DATA_HOME/batchprod/batchprod.db``
    (a laptop's embedded default, as a per-run store is a run's)."""
    url = selected_db()
    if url:
        return url
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "batchprod"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return f"sqlite:///{base / 'batchprod.db'}"


class CampaignDB:
    """Access to the workload-management tables of one central database."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_db()
        self.store = StateStore(self.url, create=True)  # the schema, made or migrated
        self.engine = self.store.engine
        self.where = self.store.where

    def close(self) -> None:
        self.store.close()

    # -- campaigns ----------------------------------------------------------------------------------
    def create(self, spec: CampaignSpec, now: float | None = None) -> int:
        """Record a campaign (state planned), its steps and its runs (not prepared yet), in one
        transaction; a name already taken is refused."""
        now = now or time.time()
        with self.engine.begin() as conn:
            if conn.execute(sa.select(campaign_t.c.id).where(campaign_t.c.name == spec.name)).first():
                raise RunError(f"{self.where}: campaign '{spec.name}' already exists (pick another name, or "
                               f"'batchprod campaign cancel {spec.name}' and use a new one)")
            cid = conn.execute(campaign_t.insert().values(
                name=spec.name, owner=spec.owner, priority=spec.priority, share=spec.share, state=PLANNED,
                spec=dump(spec), created=now, updated=now)).inserted_primary_key[0]
            for i, step in enumerate(spec.steps):
                sid = conn.execute(step_t.insert().values(
                    campaign_id=cid, position=i, name=step.name, state=GATED if step.gate else WAITING
                )).inserted_primary_key[0]
                conn.execute(campaign_run_t.insert(), [
                    {"campaign_id": cid, "step_id": sid, "config": cfg, "state": PLANNED, "updated": now}
                    for cfg in step.submit])
            self._event(conn, now, "campaign", spec.name, PLANNED, f"created by {spec.owner}: "
                        f"{len(spec.steps)} steps, {sum(len(s.submit) for s in spec.steps)} runs, "
                        f"priority {spec.priority}")
        return int(cid)

    def get(self, name: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(campaign_t).where(campaign_t.c.name == name)).mappings().first()
            if row is None:
                names = conn.execute(sa.select(campaign_t.c.name)).scalars().all()
                raise RunError(f"{self.where}: no campaign '{name}'{_did_you_mean(name, names)}")
        return dict(row)

    def campaigns(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        q = sa.select(campaign_t).order_by(campaign_t.c.id)
        if states is not None:
            q = q.where(campaign_t.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def command(self, name: str, verb: str, now: float | None = None) -> str:
        """An operator's start / pause / resume / cancel: the new state, or one line saying why not."""
        now = now or time.time()
        allowed, new = TRANSITIONS[verb]
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(campaign_t.c.id, campaign_t.c.state)
                               .where(campaign_t.c.name == name)).first()
            if row is None:
                self.get(name)  # raises, with a did-you-mean
            if row is None or row.state not in allowed:
                raise RunError(f"campaign '{name}' is {row.state if row else '?'}: cannot {verb} it "
                               f"(only a {' or '.join(allowed)} campaign)")
            conn.execute(campaign_t.update().where(campaign_t.c.id == row.id).values(state=new, updated=now))
            self._event(conn, now, "campaign", name, new, f"{verb} by {_who()}")
        return new

    def set_campaign(self, cid: int, now: float | None = None, **fields: Any) -> None:
        now = now or time.time()
        with self.engine.begin() as conn:
            conn.execute(campaign_t.update().where(campaign_t.c.id == cid).values(updated=now, **fields))
            if "state" in fields:
                name = conn.execute(sa.select(campaign_t.c.name).where(campaign_t.c.id == cid)).scalar_one()
                self._event(conn, now, "campaign", name, fields["state"], fields.get("message"))

    def reprioritize(self, name: str, priority: int, share: float | None = None) -> None:
        c = self.get(name)
        if c["state"] in FINAL:
            raise RunError(f"campaign '{name}' is {c['state']}: nothing to reprioritize")
        values: dict[str, Any] = {"priority": priority}
        if share is not None:
            values["share"] = share
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(campaign_t.update().where(campaign_t.c.id == c["id"]).values(updated=now, **values))
            self._event(conn, now, "campaign", name, c["state"],
                        f"priority {c['priority']} -> {priority}"
                        + (f", share {c['share']:g} -> {share:g}" if share is not None else "") + f" by {_who()}")

    def release_gate(self, name: str, step: str) -> None:
        c = self.get(name)
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(step_t.c.id, step_t.c.state).where(
                step_t.c.campaign_id == c["id"], step_t.c.name == step)).first()
            if row is None:
                names = conn.execute(sa.select(step_t.c.name).where(step_t.c.campaign_id == c["id"])).scalars().all()
                raise RunError(f"campaign '{name}' has no step '{step}'{_did_you_mean(step, names)}")
            if row.state != GATED:
                raise RunError(f"step '{step}' of campaign '{name}' is {row.state}, not gated: nothing to release")
            conn.execute(step_t.update().where(step_t.c.id == row.id).values(state=WAITING, released=now))
            self._event(conn, now, "step", f"{name}/{step}", WAITING, f"gate released by {_who()}")

    # -- steps and runs -----------------------------------------------------------------------------
    def steps(self, cid: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(step_t).where(step_t.c.campaign_id == cid).order_by(step_t.c.position)).mappings()]

    def runs(self, cid: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(campaign_run_t).where(campaign_run_t.c.campaign_id == cid)
                .order_by(campaign_run_t.c.id)).mappings()]

    def steps_and_runs(self, cids: list[int]) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[dict[str, Any]]]]:
        """Steps and runs of several campaigns in two queries (the dispatcher's control round)."""
        steps: dict[int, list[dict[str, Any]]] = {c: [] for c in cids}
        runs: dict[int, list[dict[str, Any]]] = {c: [] for c in cids}
        if not cids:
            return steps, runs
        with self.engine.connect() as conn:
            for r in conn.execute(sa.select(step_t).where(step_t.c.campaign_id.in_(cids))
                                  .order_by(step_t.c.campaign_id, step_t.c.position)).mappings():
                steps[r["campaign_id"]].append(dict(r))
            for r in conn.execute(sa.select(campaign_run_t).where(campaign_run_t.c.campaign_id.in_(cids))
                                  .order_by(campaign_run_t.c.id)).mappings():
                runs[r["campaign_id"]].append(dict(r))
        return steps, runs

    def set_step(self, step: Mapping[str, Any], campaign: str, now: float, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(step_t.update().where(step_t.c.id == step["id"]).values(**fields))
            if "state" in fields and fields["state"] != step["state"]:
                self._event(conn, now, "step", f"{campaign}/{step['name']}", fields["state"], fields.get("message"))

    def set_runs(self, rows: list[dict[str, Any]], now: float) -> None:
        """Progress of several campaign runs in one transaction (``id`` plus the fields that changed);
        a row with ``event`` also records that run's state change."""
        if not rows:
            return
        with self.engine.begin() as conn:
            for r in rows:
                r = dict(r)
                event = r.pop("event", None)
                conn.execute(campaign_run_t.update().where(campaign_run_t.c.id == r.pop("id"))
                             .values(updated=now, **r))
                if event:
                    self._event(conn, now, "run", event[0], event[1], r.get("message"))

    # -- sites ----------------------------------------------------------------------------------------
    def set_site(self, name: str, state: str, since: float, evidence: str | None, stats: Mapping[str, Any],
                 changed: bool, now: float) -> None:
        values = {"state": state, "since": since, "evidence": evidence, "stats": json.dumps(stats), "updated": now}
        with self.engine.begin() as conn:
            done = conn.execute(site_state_t.update().where(site_state_t.c.name == name).values(**values)).rowcount
            if not done:
                conn.execute(site_state_t.insert().values(name=name, **values))
            if changed:
                self._event(conn, now, "site", name, state, evidence)

    def site_states(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            out = {}
            for r in conn.execute(sa.select(site_state_t)).mappings():
                d = dict(r)
                d["stats"] = json.loads(d["stats"] or "{}")
                out[d["name"]] = d
        return out

    # -- events -------------------------------------------------------------------------------------
    def _event(self, conn: sa.Connection, now: float, kind: str, subject: str, state: str,
               message: str | None) -> None:
        conn.execute(ops_event_t.insert().values(time=now, kind=kind, subject=subject, state=state, message=message))

    def event(self, kind: str, subject: str, state: str, message: str | None = None, now: float | None = None) -> None:
        with self.engine.begin() as conn:
            self._event(conn, now or time.time(), kind, subject, state, message)

    def events(self, since_id: int = 0, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        q = sa.select(ops_event_t).where(ops_event_t.c.id > since_id).order_by(ops_event_t.c.id).limit(limit)
        if kind:
            q = q.where(ops_event_t.c.kind == kind)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # -- incidents ----------------------------------------------------------------------------------
    def raise_incident(self, kind: str, signature: str, campaign: str, site: str | None, evidence: str,
                       affected: list[str], now: float, count: int = 1) -> tuple[int, bool]:
        """Open an incident, or add to the open one of the same (kind, signature, campaign): 5,000
        identical failures are one incident with a count. Returns (id, new)."""
        c = incident_t.c
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(c.id, c.count, c.affected, c.state).where(
                c.kind == kind, c.signature == signature, c.campaign == campaign)).first()
            if row is None:
                iid = conn.execute(incident_t.insert().values(
                    kind=kind, signature=signature, campaign=campaign, site=site, state="open", first=now,
                    last=now, count=count, evidence=evidence, affected=json.dumps(affected[:20]), delivered=0,
                )).inserted_primary_key[0]
                self._event(conn, now, "incident", f"{kind}:{iid}", "open", f"{signature} ({evidence})")
                return int(iid), True
            sample = json.loads(row.affected or "[]")
            sample = (sample + [a for a in affected if a not in sample])[:20]
            conn.execute(incident_t.update().where(c.id == row.id).values(
                count=row.count + count, last=now, evidence=evidence, affected=json.dumps(sample), state="open"))
            if row.state != "open":
                self._event(conn, now, "incident", f"{kind}:{row.id}", "open", f"again: {signature}")
            return int(row.id), row.state != "open"

    def resolve_incidents(self, kind: str, site: str, now: float, why: str) -> None:
        c = incident_t.c
        with self.engine.begin() as conn:
            ids = conn.execute(sa.select(c.id).where(c.kind == kind, c.site == site, c.state == "open")).scalars().all()
            for iid in ids:
                conn.execute(incident_t.update().where(c.id == iid).values(state="resolved", last=now))
                self._event(conn, now, "incident", f"{kind}:{iid}", "resolved", why)

    def resolve_incident(self, iid: int, now: float | None = None) -> None:
        """An operator's resolution (it opens again if the same thing happens again)."""
        now = now or time.time()
        c = incident_t.c
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(c.kind, c.state).where(c.id == iid)).first()
            if row is None:
                raise RunError(f"{self.where}: no incident {iid}")
            if row.state == "resolved":
                raise RunError(f"incident {iid} is already resolved")
            conn.execute(incident_t.update().where(c.id == iid).values(state="resolved", last=now))
            self._event(conn, now, "incident", f"{row.kind}:{iid}", "resolved", f"by {_who()}")

    def incidents(self, state: str | None = None, campaign: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(incident_t).order_by(incident_t.c.last.desc())
        if state:
            q = q.where(incident_t.c.state == state)
        if campaign:
            q = q.where(incident_t.c.campaign == campaign)
        with self.engine.connect() as conn:
            return [_incident(r) for r in conn.execute(q).mappings()]

    def incident(self, iid: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(incident_t).where(incident_t.c.id == iid)).mappings().first()
        return None if r is None else _incident(r)

    def delivered(self, iid: int, ok: bool, error: str | None) -> None:
        c = incident_t.c
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"hook_error": error}
            if ok:
                values["delivered"] = c.delivered + 1
            conn.execute(incident_t.update().where(c.id == iid).values(**values))


def _incident(row: Mapping[str, Any]) -> dict[str, Any]:
    """An incident row with its affected sample as a list (stored as JSON)."""
    d = dict(row)
    d["affected"] = json.loads(d["affected"] or "[]")
    return d


def _who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
