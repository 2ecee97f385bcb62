"""A read-only REST API and a small dashboard over the runs under one submit root.

Everything it shows comes from the runs' state stores (the same calls as ``batchprod report``,
``report --failures``, ``report --job`` and ``provenance``), so the API, the CLI and the dashboard
can never disagree. Run names are resolved strictly inside the root, and a run whose files (state
store, graph, workflow, config) lead outside its directory through a symlink is refused: a request
cannot open a file elsewhere on the machine. A damaged run is listed as DAMAGED with its one-line
error instead of failing the listing for every run; asked for by name it is an error JSON (500).
Changing things (cancel, restart) stays with the CLI until the service has authentication.
``/metrics`` gives operators' Prometheus metrics of the central database (:mod:`.metrics`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchprod._time import plural
from batchprod.errors import BatchprodError, GraphError, RunError, WorkflowError
from batchprod.execution.paths import OutsideRunError, check_in
from batchprod.execution.rundir import CONFIG_FILE, QGRAPH_FILE, WORKFLOW_FILE
from batchprod.provenance.lineage import Provenance
from batchprod.report import summarize
from batchprod.report.failures import failures, job_history
from batchprod.report.progress import duration, words
from batchprod.report.report import DAMAGED, damaged_summary, iso
from batchprod.service.metrics import metrics_registry
from batchprod.state.database import DB_FILE
from batchprod.state.run import Run, list_runs
from batchprod.state.store import STATE_FILE, DamagedStateError

#: keys that hold epoch seconds in the report data; the API gives them as ISO 8601 (local zone)
_TIME_KEYS = frozenset({"created", "updated", "start", "end", "since", "first", "last"})


def _iso_times(obj: Any) -> Any:
    """The same data as the CLI's --json, with epoch times turned into ISO 8601 strings."""
    if isinstance(obj, dict):
        return {k: (iso(v) if k in _TIME_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
                    else _iso_times(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_iso_times(v) for v in obj]
    return obj

#: what a request may make the service open in a run's directory: none may lead outside it
RUN_FILES = (STATE_FILE, DB_FILE, f"{STATE_FILE}-wal", f"{STATE_FILE}-shm", QGRAPH_FILE, WORKFLOW_FILE, CONFIG_FILE,
             "pipeline.yaml")


def _status_of(exc: BatchprodError) -> int:
    """Damaged run files are the server's problem (500), a file leading outside a run is refused
    (403), a missing run, job or dataset is 404, a malformed request 400."""
    if isinstance(exc, OutsideRunError):
        return 403
    if isinstance(exc, DamagedStateError | GraphError | WorkflowError):
        return 500
    return 404 if isinstance(exc, RunError) else 400


def _open(d: Path) -> Run:
    for f in RUN_FILES:
        check_in(d, d / f)
    return Run(d)


def create_app(root: str | Path, db: str | None = None) -> FastAPI:
    """The API for the runs under ``root`` (a submit root, as for ``batchprod runs --root``); ``/metrics``
    reads the central database ``db`` (default: the one of ``--db`` / ``$BATCHPROD_DB`` at each scrape)."""
    base = Path(root).resolve()
    registry = metrics_registry(db)
    app = FastAPI(title="batchprod", summary="Runs, jobs, failures and provenance (read-only)")

    def open_run(name: str) -> Run:
        d = (base / name).resolve()
        if not d.is_relative_to(base) or not ((d / STATE_FILE).is_file() or (d / DB_FILE).is_file()):
            raise HTTPException(404, f"run '{name}' not found under {base}")
        return _open(d)

    def name_of(d: Path) -> str:
        return str(d.resolve().relative_to(base))

    def every_run() -> list[dict[str, Any]]:
        out = []
        for d in list_runs(base):
            name = name_of(d)
            try:
                out.append({**summarize(_open(d)), "name": name})
            except BatchprodError as exc:  # one damaged run must not hide the others
                out.append(damaged_summary(d, name, exc))
        return out

    @app.exception_handler(BatchprodError)
    async def user_error(_request: Request, exc: BatchprodError) -> JSONResponse:
        # the CLI's one-line message, never a traceback
        status = _status_of(exc)
        body: dict[str, Any] = {"detail": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        if status == 500:
            body["status"] = DAMAGED
        return JSONResponse(body, status_code=status)

    @app.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        """Every run under the root, newest first, with its job counts; a damaged run with status
        DAMAGED and its error line."""
        return _iso_times(every_run())

    @app.get("/api/runs/{name:path}/failures")
    def run_failures(name: str) -> dict[str, Any]:
        """Failed jobs grouped by failure signature, with causal error lines."""
        return _iso_times(failures(open_run(name)))

    @app.get("/api/runs/{name:path}/jobs/{job}")
    def job(name: str, job: str) -> dict[str, Any]:
        """One job's whole history (every attempt)."""
        return _iso_times(job_history(open_run(name), job))

    @app.get("/api/runs/{name:path}/provenance")
    def provenance(name: str, dataset: str = Query(..., description="path or TYPE:dim=value,..."),
                   lineage: str | None = Query(None, pattern="^(up|down)$")) -> dict[str, Any]:
        """How one output came to be (or its lineage up/down)."""
        prov = Provenance(open_run(name))
        return _iso_times(prov.lineage(dataset, lineage) if lineage else prov.record(dataset))

    @app.get("/api/runs/{name:path}")
    def run(name: str) -> dict[str, Any]:
        """One run: status, per-label job and quantum counts."""
        return _iso_times({**summarize(open_run(name)), "name": name})

    def campaigns_db() -> Any:
        from batchprod.campaign.db import CampaignDB

        return CampaignDB(db)

    @app.get("/api/campaigns")
    def campaigns() -> list[dict[str, Any]]:
        """Every campaign of the central database: state, owner, priority, share."""
        return _iso_times([{k: v for k, v in c.items() if k != "spec"} for c in campaigns_db().campaigns()])

    @app.get("/api/campaigns/{name}")
    def campaign(name: str) -> dict[str, Any]:
        """One campaign per step and per site: done, running, queued, failed, throughput, ETA."""
        from batchprod.campaign.status import campaign_status

        return _iso_times(campaign_status(campaigns_db(), name))

    @app.get("/api/incidents")
    def incidents(state: str | None = Query(None, pattern="^(open|resolved)$"),
                  campaign: str | None = None) -> list[dict[str, Any]]:
        """Incidents (failed jobs grouped by signature, sites down or degraded, steps stuck)."""
        return _iso_times(campaigns_db().incidents(state=state, campaign=campaign))

    @app.get("/api/sites")
    def sites() -> list[dict[str, Any]]:
        """What the dispatcher last believed of each site, with the evidence and its counters."""
        return _iso_times(list(campaigns_db().site_states().values()))

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics of the central database (jobs, attempts, sites, incidents, campaigns)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        """Every run with a progress bar per task label; refreshes itself every 10 s."""
        return _dashboard(every_run(), base)

    return app


def _dashboard(runs: list[dict[str, Any]], base: Path) -> str:
    e = html.escape
    parts = [f"<h1>batchprod: {plural(len(runs), 'run')} under {e(str(base))}</h1>"]
    for r in runs:
        if r["status"] == DAMAGED:
            parts.append(f"<h2>{e(r['name'])} <small class='{DAMAGED}'>{DAMAGED}</small></h2>"
                         f"<p class='{DAMAGED}'>{e(r['error'])}</p>")
            continue
        j = r["jobs"]
        counts = words({k: v for k, v in j.items() if k != "total"}) or "no jobs"
        when = f"started {r['started']}" if r.get("started") else "not started"
        hint = f"<p class='INTERRUPTED'>its engine is gone; continue with: <code>{e(r['hint'])}</code></p>" \
            if r.get("hint") else ""
        parts.append(f"<h2>{e(r['name'])} <small class='{e(r['status'])}'>{e(r['status'])}</small></h2>"
                     f"<p>{plural(j['total'], 'job')}: {e(counts)}; {e(when)}, elapsed {duration(r['elapsed_s'])}</p>"
                     f"{hint}<table>")
        for label, row in r["labels"].items():
            done = 100 * row["succeeded"] / row["total"] if row["total"] else 0
            bad = 100 * row["failed"] / row["total"] if row["total"] else 0
            parts.append(f"<tr><td>{e(label)}</td><td class='bar'><span class='ok' style='width:{done:.1f}%'></span>"
                         f"<span class='bad' style='width:{bad:.1f}%'></span></td>"
                         f"<td>{row['succeeded']:,}/{row['total']:,}</td><td>{format(row['failed'], ',') if row['failed'] else ''}</td></tr>")
        parts.append(f"</table><p><a href='api/runs/{e(r['name'])}/failures'>failures</a> · "
                     f"<a href='api/runs/{e(r['name'])}'>json</a></p>")
    style = ("body{font-family:sans-serif;margin:2em}td{padding:2px 8px}.bar{width:300px;background:#eee}"
             ".bar span{display:inline-block;height:12px}.ok{background:#2a2}.bad{background:#c22}"
             ".FAILED{color:#c22}.SUCCEEDED{color:#2a2}.DAMAGED{color:#b60}.INTERRUPTED{color:#b60}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
            f"<title>batchprod</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
