"""``batchprod campaign ...``, ``batchprod incidents`` and ``batchprod sites status``: the operators'
commands of workload management (the run commands are in ``cli.py``)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from batchprod._time import iso, plural
from batchprod.cli_common import DB_OPTION, _user_errors, console, err_console
from batchprod.report.progress import duration


def _db() -> Any:
    from batchprod.campaign.db import CampaignDB

    return CampaignDB()


def _iso(t: float | None) -> str:
    return iso(t) if t else "-"


def _dur(s: float | None) -> str:
    return "-" if s is None else duration(s)


@click.group()
def campaign() -> None:
    """Campaigns: named, prioritized sets of runs in steps, dispatched over a site catalog."""


@campaign.command("create")
@click.argument("campaign_file", type=click.Path(path_type=Path))
@click.option("--start", "start_now", is_flag=True, help="Start it at once (default: planned until 'start').")
@DB_OPTION
@_user_errors
def campaign_create(campaign_file: Path, start_now: bool) -> None:
    """Record a campaign from its YAML file (every submit config is checked first)."""
    from batchprod.campaign.spec import load_campaign

    spec = load_campaign(campaign_file)
    db = _db()
    db.create(spec)
    runs = sum(len(s.submit) for s in spec.steps)
    console.print(f"campaign {spec.name}: {plural(len(spec.steps), 'step')}, {plural(runs, 'run')}, priority {spec.priority} "
                  f"(owner {spec.owner}) in {db.where}")
    if start_now:
        db.command(spec.name, "start")
        console.print(f"campaign {spec.name}: running (dispatched by 'batchprod campaign run --sites SITES.yaml')")


def _verb(verb: str, help_text: str) -> None:
    @campaign.command(verb, help=help_text)
    @click.argument("name")
    @DB_OPTION
    @_user_errors
    def cmd(name: str) -> None:
        state = _db().command(name, verb)
        console.print(f"campaign {name}: {state}")


_verb("start", "Let the dispatcher start the campaign's steps.")
_verb("pause", "Start no new jobs of the campaign (running ones finish).")
_verb("resume", "Undo pause.")
_verb("cancel", "Stop the campaign: its running jobs are killed, nothing more starts.")


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and math.isnan(value):  # (nan passes every range comparison)
        raise click.BadParameter("expected a finite number, got nan", ctx, param)
    return value


@campaign.command("reprioritize", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("priority", type=click.IntRange(-1_000_000, 1_000_000))  # (the campaign file's bounds)
@click.option("--share", type=click.FloatRange(min=0.0, max=1e6, min_open=True), default=None, callback=_not_nan,
              help="Also set its fair-share target among campaigns of equal priority.")
@DB_OPTION
@_user_errors
def campaign_reprioritize(name: str, priority: int, share: float | None) -> None:
    """Change a campaign's priority (higher first); takes effect at the dispatcher's next round."""
    _db().reprioritize(name, priority, share)
    console.print(f"campaign {name}: priority {priority}" + (f", share {share:g}" if share is not None else ""))


@campaign.group("gate")
def gate() -> None:
    """Manual gates between steps."""


@gate.command("release")
@click.argument("name")
@click.argument("step")
@DB_OPTION
@_user_errors
def gate_release(name: str, step: str) -> None:
    """Let a gated step start (once its dependencies are met)."""
    _db().release_gate(name, step)
    console.print(f"campaign {name}: step {step} released")


@campaign.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@DB_OPTION
@_user_errors
def campaign_status(name: str | None, as_json: bool) -> None:
    """Per step and per site: done, running, queued, failed, throughput, ETA (no NAME: all campaigns)."""
    db = _db()
    if name is None:
        rows = db.campaigns()
        if as_json:
            click.echo(json.dumps([{k: v for k, v in r.items() if k != "spec"} for r in rows], indent=1))
            return
        t = Table("campaign", "owner", "state", "priority", "share", "updated", "message", box=None)
        for r in rows:
            t.add_row(r["name"], r["owner"], r["state"], str(r["priority"]), f"{r['share']:g}", _iso(r["updated"]),
                      r["message"] or "")
        console.print(t if rows else f"no campaigns in {db.where}")
        return
    from batchprod.campaign.status import campaign_status as status

    s = status(db, name)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    console.print(f"campaign {s['campaign']} ({s['owner']}): {s['state']}, priority {s['priority']}, "
                  f"share {s['share']:g}" + (f" — {s['message']}" if s["message"] else ""))
    t = Table("step", "state", "runs", "jobs", "done", "running", "queued", "waiting", "failed", "cancelled",
              "per hour", "ETA", box=None)
    for st in s["steps"]:
        t.add_row(st["step"], st["state"], str(st["runs"]), f"{st['jobs']:,}", f"{st['done']:,}", f"{st['running']:,}",
                  f"{st['queued']:,}", f"{st['waiting']:,}", f"{st['failed']:,}", f"{st['cancelled']:,}",
                  f"{st['rate_per_h']:,.0f}", _dur(st["eta_s"]))
    console.print(t)
    for st in s["steps"]:
        if st["message"]:
            console.print(f"  {st['step']}: {st['message']}")
    if s["sites"]:
        t = Table("site", "state", "running", "queued", "done", "failed", "per hour", box=None)
        for si in s["sites"]:
            state = s["site_states"].get(si["site"], {}).get("state", "-")
            t.add_row(si["site"], state, f"{si['running']:,}", f"{si['queued']:,}", f"{si['done']:,}",
                      f"{si['failed']:,}", f"{si['rate_per_h']:,.0f}")
        console.print(t)


@campaign.command("run")
@click.option("--sites", "catalog", required=True, type=click.Path(path_type=Path), help="The site catalog (YAML).")
@click.option("--forever", is_flag=True, help="Keep dispatching when no campaign has work (a service).")
@click.option("--events", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append every state change as a JSON line to this file.")
@click.option("--hook-url", "hook_urls", multiple=True, metavar="URL", help="POST each new incident as JSON here.")
@click.option("--hook-command", "hook_commands", multiple=True, metavar="CMD",
              help="Run CMD (no shell) for each new incident, the incident as JSON on stdin.")
@click.option("--control-interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between reading the campaigns (operator commands take effect then).")
@click.option("--down-after", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds a site's scheduler may not answer before the site is declared down.")
@click.option("--probe-after", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds a site stays down before a probe job is sent (doubles after each failed probe).")
@DB_OPTION
@_user_errors
def campaign_run(catalog: Path, forever: bool, events: Path | None, hook_urls: tuple[str, ...],
                 hook_commands: tuple[str, ...], control_interval: float, down_after: float,
                 probe_after: float) -> None:
    """Dispatch every running campaign's jobs over the catalog's sites, in the foreground."""
    from batchprod.campaign.events import EventLog
    from batchprod.campaign.runner import CampaignRunner
    from batchprod.campaign.sites import engine_sites, load_catalog
    from batchprod.engine.health import HealthPolicy

    cat = load_catalog(catalog)
    db = _db()
    hooks = None
    if hook_urls or hook_commands:
        from batchprod.campaign.hooks import IncidentHooks

        hooks = IncidentHooks(db, commands=list(hook_commands), urls=list(hook_urls))
    policy = HealthPolicy(unanswered_for=down_after, probe_after=probe_after)
    runner = CampaignRunner(db, engine_sites(cat), control_interval=control_interval, policy=policy, hooks=hooks,
                            events=EventLog(events) if events is not None else None,
                            log=lambda line: err_console.print(f"{_iso(time.time())} {line}", highlight=False),
                            catalog_path=catalog)
    err_console.print(f"dispatching over {len(runner.sites)} sites ({', '.join(runner._site_names)}) from {db.where}")
    runner.run(forever=forever)
    left = [c["name"] for c in db.campaigns(states=("running", "paused"))]
    err_console.print("no campaign has work left" if not left else f"stopped; still running: {', '.join(left)}")


def start_dispatcher(catalog: Path) -> Any:
    """The campaign dispatcher in a thread of this process (``serve --dispatch``); returns a function
    that stops it (its attempts are stopped, its campaigns go on at the next start)."""
    import threading

    from batchprod.campaign.runner import CampaignRunner
    from batchprod.campaign.sites import engine_sites, load_catalog

    cat = load_catalog(catalog)
    runner = CampaignRunner(_db(), engine_sites(cat),
                            log=lambda line: err_console.print(f"{_iso(time.time())} {line}", highlight=False),
                            catalog_path=catalog)
    reason: list[str] = []
    thread = threading.Thread(target=runner.run, kwargs={"forever": True, "stop": lambda: reason[0] if reason else None},
                              name="batchprod-dispatcher", daemon=True)
    thread.start()
    err_console.print(f"dispatching campaigns over {len(runner.sites)} sites ({', '.join(runner._site_names)})")

    def stop() -> None:
        reason.append("service stopped")
        thread.join(60)

    return stop


@click.command("incidents")
@click.option("--campaign", "campaign_name", default=None, help="Only this campaign's.")
@click.option("--all", "show_all", is_flag=True, help="Resolved ones too.")
@click.option("--resolve", "resolve_ids", multiple=True, type=int, metavar="ID",
              help="Mark this incident resolved (an operator dealt with it); it opens again if it recurs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (times in ISO 8601).")
@DB_OPTION
@_user_errors
def incidents(campaign_name: str | None, show_all: bool, resolve_ids: tuple[int, ...], as_json: bool) -> None:
    """Incidents: jobs failed for good (grouped by failure signature), sites down or degraded, steps stuck."""
    db = _db()
    for iid in resolve_ids:
        db.resolve_incident(iid)
        console.print(f"incident {iid}: resolved")
    if resolve_ids:
        return
    rows = db.incidents(state=None if show_all else "open", campaign=campaign_name)
    if as_json:
        click.echo(json.dumps([{**r, "first": _iso(r["first"]), "last": _iso(r["last"])} for r in rows], indent=1))
        return
    if not rows:
        console.print("no open incidents" if not show_all else "no incidents")
        return
    t = Table("id", "kind", "state", "campaign", "site", "count", "first", "last", "what", box=None)
    for r in rows:
        t.add_row(str(r["id"]), r["kind"], r["state"], r["campaign"] or "-", r["site"] or "-", f"{r['count']:,}",
                  _iso(r["first"]), _iso(r["last"]), r["signature"])
    console.print(t)


@click.command("status")
@click.option("--json", "as_json", is_flag=True)
@DB_OPTION
@_user_errors
def sites_status(as_json: bool) -> None:
    """What the dispatcher last believed of each site, the evidence, and why placements skipped it."""
    rows = _db().site_states()
    if as_json:
        click.echo(json.dumps(list(rows.values()), indent=1))
        return
    if not rows:
        console.print("no site states yet (they are written by 'batchprod campaign run')")
        return
    t = Table("site", "state", "since", "running", "started", "failed", "preempted", "skipped", "evidence", box=None)
    for r in rows.values():
        st = r["stats"]
        skips = ", ".join(f"{k}={v:,}" for k, v in sorted(st.get("skips", {}).items())) or "-"
        t.add_row(r["name"], r["state"], _iso(r["since"]), str(st.get("running", 0)), f"{st.get('started', 0):,}",
                  f"{st.get('failed', 0):,}", f"{st.get('preempted', 0):,}", skips, r["evidence"] or "")
    console.print(t)


@campaign.command("simulate")
@click.argument("campaign_file", type=click.Path(path_type=Path))
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--history", "history", multiple=True, metavar="RUN",
              help="Job durations and failure rates per label from this finished run (submit dir or name).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: utilization per site and queued jobs by priority over time.")
@click.option("--json", "as_json", is_flag=True, help="The whole report, machine-readable.")
@DB_OPTION
@_user_errors
def campaign_simulate(campaign_file: Path, catalog: Path, history: tuple[str, ...], plot_path: Path | None,
                      as_json: bool) -> None:
    """Run the real dispatcher on simulated sites in virtual time: makespan, utilization, priorities."""
    from batchprod.campaign.simulate import check_plotting, plot, simulate
    from batchprod.campaign.sites import load_catalog
    from batchprod.campaign.spec import load_campaign
    from batchprod.state.run import find_run

    if plot_path is not None:
        check_plotting(plot_path)
    spec = load_campaign(campaign_file)
    cat = load_catalog(catalog)
    runs = [find_run(h) for h in history]
    result = simulate(spec, cat, str(campaign_file), history=runs)
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        sys.exit(0 if all(c["state"] == "done" for c in result.campaigns) else 1)
    console.print(f"simulated {result.jobs:,} jobs ({result.assignments:,} attempts) in {result.wall_seconds:.1f} s: "
                  f"makespan {_dur(result.makespan)}")
    t = Table("campaign", "priority", "state", "finished after", box=None)
    for c in result.campaigns:
        t.add_row(c["campaign"], str(c["priority"]), c["state"], _dur(c["finished_s"]))
    console.print(t)
    t = Table("site", "cores", "attempts", "failed", "preempted", "mean use", box=None)
    for s in result.sites:
        t.add_row(s["site"], str(s["cores"] or "-"), f"{s['started']:,}", f"{s['failed']:,}", f"{s['preempted']:,}",
                  f"{s['mean_utilization']:.0%}")
    console.print(t)
    for e in result.site_events:
        console.print(f"  {_dur(e['t'])}: site {e['site']} {e['state']} ({e['evidence']})")
    if plot_path is not None:
        console.print(f"plot: {plot_path}")
    if any(c["state"] != "done" for c in result.campaigns):
        sys.exit(1)
