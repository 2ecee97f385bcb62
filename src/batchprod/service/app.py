"""A read-only REST API and a small dashboard over the runs under one submit root.

Everything it shows comes from the runs' state stores (the same calls as ``batchprod report``,
``report --failures``, ``report --job`` and ``provenance``), so the API, the CLI and the dashboard
can never disagree. Run names are resolved strictly inside the root: a request cannot open a state
store elsewhere on the machine. Changing things (cancel, restart) stays with the CLI until the
service has authentication.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from batchprod.errors import BatchprodError, RunError
from batchprod.execution.run import STATE_FILE, Run, list_runs
from batchprod.provenance.lineage import Provenance
from batchprod.report import summarize
from batchprod.report.failures import failures, job_history


def create_app(root: str | Path) -> FastAPI:
    """The API for the runs under ``root`` (a submit root, as for ``batchprod runs --root``)."""
    base = Path(root).resolve()
    app = FastAPI(title="batchprod", summary="Runs, jobs, failures and provenance (read-only)")

    def open_run(name: str) -> Run:
        d = (base / name).resolve()
        if not d.is_relative_to(base) or not (d / STATE_FILE).is_file():
            raise HTTPException(404, f"run '{name}' not found under {base}")
        return Run(d)

    def name_of(d: Path) -> str:
        return str(d.resolve().relative_to(base))

    @app.exception_handler(BatchprodError)
    async def user_error(_request: Request, exc: BatchprodError) -> JSONResponse:
        # the CLI's one-line message; a missing job or dataset is 404, a malformed request 400
        return JSONResponse({"detail": str(exc)}, status_code=404 if isinstance(exc, RunError) else 400)

    @app.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        """Every run under the root, newest first, with its job counts."""
        return [{**summarize(Run(d)), "name": name_of(d)} for d in list_runs(base)]

    @app.get("/api/runs/{name:path}/failures")
    def run_failures(name: str) -> dict[str, Any]:
        """Failed jobs grouped by failure signature, with causal error lines."""
        return failures(open_run(name))

    @app.get("/api/runs/{name:path}/jobs/{job}")
    def job(name: str, job: str) -> dict[str, Any]:
        """One job's whole history (every attempt)."""
        return job_history(open_run(name), job)

    @app.get("/api/runs/{name:path}/provenance")
    def provenance(name: str, dataset: str = Query(..., description="path or TYPE:dim=value,..."),
                   lineage: str | None = Query(None, pattern="^(up|down)$")) -> dict[str, Any]:
        """How one output came to be (or its lineage up/down)."""
        prov = Provenance(open_run(name))
        return prov.lineage(dataset, lineage) if lineage else prov.record(dataset)

    @app.get("/api/runs/{name:path}")
    def run(name: str) -> dict[str, Any]:
        """One run: status, per-label job and quantum counts."""
        return {**summarize(open_run(name)), "name": name}

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        """Every run with a progress bar per task label; refreshes itself every 10 s."""
        return _dashboard([{**summarize(Run(d)), "name": name_of(d)} for d in list_runs(base)], base)

    return app


def _dashboard(runs: list[dict[str, Any]], base: Path) -> str:
    e = html.escape
    parts = [f"<h1>batchprod: {len(runs)} runs under {e(str(base))}</h1>"]
    for r in runs:
        j = r["jobs"]
        parts.append(f"<h2>{e(r['name'])} <small class='{e(r['status'])}'>{e(r['status'])}</small></h2>"
                     f"<p>{j['succeeded']}/{j['total']} jobs succeeded, {j['failed']} failed, "
                     f"{j['running']} running; {r['elapsed_s']:.0f} s</p><table>")
        for label, row in r["labels"].items():
            done = 100 * row["succeeded"] / row["total"] if row["total"] else 0
            bad = 100 * row["failed"] / row["total"] if row["total"] else 0
            parts.append(f"<tr><td>{e(label)}</td><td class='bar'><span class='ok' style='width:{done:.1f}%'></span>"
                         f"<span class='bad' style='width:{bad:.1f}%'></span></td>"
                         f"<td>{row['succeeded']}/{row['total']}</td><td>{row['failed'] or ''}</td></tr>")
        parts.append(f"</table><p><a href='api/runs/{e(r['name'])}/failures'>failures</a> · "
                     f"<a href='api/runs/{e(r['name'])}'>json</a></p>")
    style = ("body{font-family:sans-serif;margin:2em}td{padding:2px 8px}.bar{width:300px;background:#eee}"
             ".bar span{display:inline-block;height:12px}.ok{background:#2a2}.bad{background:#c22}"
             ".FAILED{color:#c22}.SUCCEEDED{color:#2a2}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
            f"<title>batchprod</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
