"""The ``batchprod`` command line: thin — parse, call, print.

Exit codes: 0 = the run (or command) fully succeeded, 1 = the run finished with failed or cancelled
jobs, 2 = a user error (bad config, unknown run, ...) reported as one line without a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from batchprod import cli_campaign
from batchprod.cli_common import DB_OPTION, F, _user_errors, console, err_console
from batchprod.errors import BatchprodError


def _overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs, VALUE read as bounded YAML; a bad one is a one-line ConfigError."""
    from batchprod.config import parse_overrides

    return parse_overrides(pairs)


ROOT_OPTION = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BATCHPROD_SUBMIT_ROOT",
    default=None,
    help="Directory holding run submit directories (default ./submit).",
)


OVERRIDE_OPTION = click.option(
    "-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help="Set a config key (dotted path)."
)


def _existing_run_options(fn: F) -> F:
    fn = click.option("--replace-run", is_flag=True,
                      help="The output run already holds datasets: remove its rows and files first.")(fn)
    fn = click.option("--extend-run", is_flag=True,
                      help="The output run already holds datasets: keep them, run only jobs with new outputs.")(fn)
    return fn


def _existing(extend_run: bool, replace_run: bool) -> str:
    if extend_run and replace_run:
        raise click.UsageError("give --extend-run or --replace-run, not both")
    return "extend" if extend_run else "replace" if replace_run else "refuse"


@click.group()
@click.version_option(package_name="batchprod")
def main() -> None:
    """batchprod: run scientific pipelines at scale, and say exactly what happened."""
    _private_files()
    for c in (console, err_console):
        if not c.is_terminal:
            c.width = 1_000_000  # piped or in a file: whole lines, nothing cut to fit 80 columns


def _private_files() -> None:
    """What batchprod writes (run state, logs, configs, and the jobs it starts) is private to its user:
    0600 files, 0700 directories. $BATCHPROD_UMASK (octal, e.g. 022) opens it up for a shared group."""
    import os

    raw = os.environ.get("BATCHPROD_UMASK", "077")
    try:
        mask = int(raw, 8)
        if not 0 <= mask <= 0o777:
            raise ValueError
    except ValueError:
        raise click.UsageError(f"$BATCHPROD_UMASK: expected an octal umask such as 077 or 022, got {raw!r}") from None
    os.umask(mask)


def _print_prepare(run: Any, timings: list[Any]) -> None:
    from batchprod._time import plural
    from batchprod.graph import describe

    wf = run.workflow
    for t in timings:
        console.print(f"  {t.stage:<22} {t.seconds:8.2f}s  peak {t.peak_mb:8.0f} MB", style="dim")
    console.print(f"graph:    {describe(run.qgraph)}")
    final = " + finalJob" if wf.final is not None else ""
    console.print(f"workflow: {plural(len(wf), 'job')}{final}, {plural(wf.n_dependencies, 'dependency', 'dependencies')}, groups: "
                  + ", ".join(g.name for g in wf.groups))
    console.print(f"run:      {run.name}\nsubmit:   {run.submit_dir}")
    for note in getattr(run, "notes", ()):
        console.print(f"note:     {note}")


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@OVERRIDE_OPTION
@click.option("--wms", type=click.Choice(["htcondor"]), default=None,
              help="Also export the workflow for this WMS (htcondor: a DAGMan DAG + submit files).")
@_existing_run_options
@DB_OPTION
@_user_errors
def prepare(config: Path, overrides: tuple[str, ...], wms: str | None, extend_run: bool, replace_run: bool) -> None:
    """Build the quantum graph and workflow into a submit directory; run nothing."""
    from batchprod.engine.prepare import prepare as do_prepare

    timings: list[Any] = []
    run = do_prepare(config, _overrides(overrides), timings, existing=_existing(extend_run, replace_run))
    _print_prepare(run, timings)
    if wms == "htcondor":
        from batchprod.wms.htcondor import export_dag

        dag = export_dag(run)
        console.print(f"htcondor: {dag} (validated, not run here): condor_submit_dag {dag}")


def _execute_foreground(run: Any, show_progress: bool) -> int:
    from batchprod.engine.control import execute
    from batchprod.execution.states import RunState
    from batchprod.report import render_table, summarize
    from batchprod.report.progress import ProgressView
    from batchprod.wms.registry import get_wms

    wms = get_wms(run.wms_name())
    total = run.store.run_info()["n_jobs"]
    if show_progress:
        with ProgressView(run.name, total, console) as view:
            state = execute(wms, run, view)
    else:
        state = execute(wms, run)
    from batchprod.engine.orchestrator import INGEST_FAILED

    summary = summarize(run)
    ok = state == RunState.SUCCEEDED and not (summary.get("message") or "").startswith(INGEST_FAILED)
    console.print(render_table(summary, console.width))
    if state != RunState.SUCCEEDED:
        console.print(f"next: batchprod report {run.submit_dir} --failures; after a fix: "
                      f"batchprod restart {run.submit_dir}", highlight=False, soft_wrap=True)
    elif not ok:  # every job done, the registry not told
        console.print(f"next: batchprod restart {run.submit_dir} (it repeats the ingest)", highlight=False,
                      soft_wrap=True)
    return 0 if ok else 1


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@OVERRIDE_OPTION
@click.option("--detach", is_flag=True, help="Run in the background; follow with 'batchprod report'.")
@_existing_run_options
@DB_OPTION
@_user_errors
def submit(config: Path, overrides: tuple[str, ...], detach: bool, extend_run: bool, replace_run: bool) -> None:
    """Prepare and run a workflow (foreground with a live progress bar, or --detach)."""
    from batchprod.engine.prepare import prepare as do_prepare

    timings: list[Any] = []
    run = do_prepare(config, _overrides(overrides), timings, existing=_existing(extend_run, replace_run))
    _print_prepare(run, timings)
    if detach:
        _detach(run)
        return
    sys.exit(_execute_foreground(run, show_progress=True))


@main.command("_execute", hidden=True)
@click.argument("submit_dir", type=click.Path(path_type=Path))
@click.option("--lock-fd", type=int, default=None, help="The run's lock, taken by the detaching parent.")
@DB_OPTION
@_user_errors
def execute_cmd(submit_dir: Path, lock_fd: int | None) -> None:
    """Run a prepared run in this process (used by --detach)."""
    from batchprod.engine import lock
    from batchprod.state.run import Run

    if lock_fd is not None:
        lock.adopt(submit_dir, lock_fd)
    sys.exit(_execute_foreground(Run(submit_dir), show_progress=True))  # plain lines into orchestrator.log


def _latest(root: Path | None) -> str:
    from batchprod.errors import RunError
    from batchprod.state.run import list_runs

    runs = list_runs(root)
    if not runs:
        raise RunError(f"no runs under {root or Path.cwd() / 'submit'}")
    return str(runs[0])


@main.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--failures", is_flag=True, help="Failed jobs grouped by failure signature, with causes.")
@click.option("--job", "job_name", default=None, help="One job's whole history and log paths.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="With --failures: how many failed jobs to detail (every signature gets one anyway).")
@click.option("--all", "show_all", is_flag=True, help="With --failures: detail every failed job.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              metavar="FILE.tsv", help="Write a trace: one TSV row per job attempt (like Nextflow's); '-' = stdout.")
@click.option("--watch", is_flag=True, help="Refresh the report until the run ends.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between --watch refreshes.")
@DB_OPTION
@_user_errors
def report(run_ref: str | None, root: Path | None, as_json: bool, failures: bool, job_name: str | None,
           limit: int, show_all: bool, trace_path: Path | None, watch: bool, interval: float) -> None:
    """Job counts per task label and a run summary (latest run if RUN is omitted).

    Exit code 0 only if the whole run succeeded."""
    from batchprod.report import render_table, summarize
    from batchprod.report.failures import failures as get_failures
    from batchprod.report.failures import job_history, render_failures, render_history
    from batchprod.state.run import find_run

    run = find_run(run_ref or _latest(root), root)
    if watch:
        sys.exit(_watch(run, interval))
    s = summarize(run)
    if trace_path is not None:
        from batchprod.report.trace import write_trace

        n = write_trace(run, trace_path)
        if str(trace_path) != "-":
            click.echo(f"trace: {n:,} attempts written to {trace_path}", err=True)
        sys.exit(0 if s["status"] == "SUCCEEDED" else 1)
    if job_name:
        data: Any = job_history(run, job_name)
        rendered = render_history(data)
    elif failures:
        data = get_failures(run, limit=None if show_all else limit)
        rendered = [render_table(s, console.width), *render_failures(data, console.width)]
    else:
        data, rendered = s, [render_table(s, console.width)]
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for item in rendered:
            console.print(item)
    sys.exit(0 if s["status"] == "SUCCEEDED" else 1)


def _watch(run: Any, interval: float) -> int:
    """``report --watch``: the report table, refreshed until the run is no longer RUNNING."""
    import time

    from rich.live import Live

    from batchprod._time import iso_now
    from batchprod.engine import lock
    from batchprod.report import render_table, summarize

    def live() -> bool:  # an engine drives the run (or is starting to: it holds the lock already)
        return s["status"] == "RUNNING" or not lock.is_free(run.submit_dir)

    s = summarize(run)
    if console.is_terminal:
        with Live(render_table(s, console.width), console=console, auto_refresh=False) as live_view:
            while live():
                time.sleep(interval)
                s = summarize(run)
                live_view.update(render_table(s, console.width), refresh=True)
    else:
        from batchprod.report.progress import DONE, words

        while True:
            cols = {k: v for k, v in s["jobs"].items() if k != "total"}
            done = sum(cols.get(c, 0) for c in DONE)
            click.echo(f"{iso_now()} {s['run']}: {s['status']}, {done:,} of "
                       f"{s['jobs']['total']:,} jobs done ({words(cols) or 'nothing yet'})")
            if not live():
                break
            time.sleep(interval)
            s = summarize(run)
        console.print(render_table(s, console.width))
    return 0 if s["status"] == "SUCCEEDED" else 1


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("job_name", metavar="JOB")
@ROOT_OPTION
@click.option("--attempt", type=click.IntRange(min=1), default=None, help="Attempt number (default: the latest).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended until the attempt has ended.")
@click.option("--stdout", "stream", flag_value="stdout", default=None, help="Only the attempt's stdout.")
@click.option("--stderr", "stream", flag_value="stderr", help="Only the attempt's stderr.")
@DB_OPTION
@_user_errors
def logs(run_ref: str, job_name: str, root: Path | None, attempt: int | None, follow: bool, stream: str | None) -> None:
    """Print a job attempt's stdout and stderr (the latest attempt unless --attempt N); --follow
    tails them while it runs and returns when it has ended."""
    import os

    from batchprod.report.logs import print_logs
    from batchprod.state.run import find_run

    run = find_run(run_ref, root)
    try:
        print_logs(run, job_name, attempt, out=sys.stdout, follow=follow, stream=stream or "both")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `batchprod logs RUN JOB | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("dataset")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="The whole record, machine-readable.")
@click.option("--lineage", type=click.Choice(["up", "down"]), default=None,
              help="Every quantum it was made from (up) or that was made from it (down).")
@click.option("--verify", is_flag=True, help="Re-read the dataset and its inputs and compare checksums.")
@click.option("--prov", "as_prov", is_flag=True, help="The record as W3C PROV-JSON.")
@DB_OPTION
@_user_errors
def provenance(run_ref: str, dataset: str, root: Path | None, as_json: bool, lineage: str | None,
               verify: bool, as_prov: bool) -> None:
    """How one output of RUN came to be: task, job, host, software, config, inputs with checksums.

    DATASET is a published path or TYPE:dim=value,dim=value (e.g. calexp:visit=1,detector=2).
    Exit code 1 if --verify finds a changed or missing file."""
    from batchprod.provenance.lineage import Provenance, render_lineage, render_record, to_prov_json
    from batchprod.state.run import find_run

    if as_prov and lineage:
        raise click.UsageError("--prov exports one dataset's record; use it without --lineage")
    prov = Provenance(find_run(run_ref, root))
    data = prov.lineage(dataset, lineage) if lineage else prov.record(dataset, verify=verify)
    if as_prov and not lineage:
        click.echo(json.dumps(to_prov_json(data), indent=2))
    elif as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(render_lineage(data) if lineage else render_record(data))
    bad = [v for v in data.get("verify", []) if v["status"] in ("changed", "missing")]
    sys.exit(1 if bad else 0)


@main.command()
@click.argument("run_ref", metavar="RUN")
@ROOT_OPTION
@click.option("--detach", is_flag=True, help="Continue in the background.")
@OVERRIDE_OPTION
@DB_OPTION
@_user_errors
def restart(run_ref: str, root: Path | None, detach: bool, overrides: tuple[str, ...]) -> None:
    """Continue a run: succeeded jobs are kept; failed, unready, cancelled and interrupted jobs run
    again with a fresh retry budget (learned memory and attempt counts are kept).

    -o changes job values from now on (requestWalltime, requestMemory, numberOfRetries, ... at the top
    level or as pipetask.LABEL.KEY / cluster.NAME.KEY / finalJob.KEY), recorded in the run's history."""
    from batchprod.engine import lock
    from batchprod.state.run import add_restart_overrides, find_run

    run = find_run(run_ref, root)
    if overrides:
        with lock.run_lock(run.submit_dir, run.name):  # not while an engine drives the run
            for said in add_restart_overrides(run, _overrides(overrides)):
                console.print(f"changed from now on: {said}")
    from batchprod.report.report import restart_plan

    with lock.run_lock(run.submit_dir, run.name):  # before anything else: a second restart stops here
        plan, todo = restart_plan(run)
        console.print(plan)
        if not todo:
            return  # a finished run is left as it is: its times and outputs stay true
        if detach:
            _detach(run)  # hands the lock it holds to the engine: no moment without one
            return
        sys.exit(_execute_foreground(run, show_progress=True))


def _detach(run: Any) -> None:
    """Start the engine in the background. The run's lock is taken here, before the fork, and handed
    to the child: of two racing ``--detach`` calls one gets the run, the other an error at once."""
    import os

    from batchprod.engine import lock

    fd = lock.acquire(run.submit_dir, run.name)
    log = open(run.submit_dir / "orchestrator.log", "ab")  # noqa: SIM115 (handed to the child)
    from batchprod.state.database import ENV_DB, selected_db

    db = selected_db()  # the engine opens the run's central database too (its URL: never written down)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchprod.cli", "_execute", str(run.submit_dir), "--lock-fd", str(fd)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, pass_fds=(fd,),
        env={**os.environ, ENV_DB: db} if db else None,
    )
    log.close()
    lock.forget(run.submit_dir)  # the child holds it now
    console.print(f"detached: orchestrator pid {proc.pid}; follow with: batchprod report {run.submit_dir}")


@main.command()
@click.argument("run_ref", metavar="RUN")
@ROOT_OPTION
@DB_OPTION
@_user_errors
def cancel(run_ref: str, root: Path | None) -> None:
    """Stop every running job of a run (whole process groups) and mark the run CANCELLED."""
    from batchprod.engine.control import cancel as cancel_run
    from batchprod.state.run import find_run
    from batchprod.wms.registry import get_wms

    run = find_run(run_ref, root)
    console.print(cancel_run(get_wms(run.wms_name()), run))


@main.command()
@ROOT_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--dispatch", "catalog", type=click.Path(path_type=Path), default=None, metavar="SITES.yaml",
              help="Also dispatch the running campaigns over this site catalog (as 'campaign run --forever').")
@DB_OPTION
@_user_errors
def serve(root: Path | None, host: str, port: int, catalog: Path | None) -> None:
    """Read-only REST API (/api/runs/..., /api/campaigns/..., /api/incidents, /api/sites), Prometheus
    /metrics and dashboard (/) over the runs under the submit root and the central database.

    Needs the extra: pip install 'batchprod[service]'."""
    try:
        import uvicorn

        from batchprod.service.app import create_app
    except ImportError:
        raise click.ClickException("the service needs its extra: pip install 'batchprod[service]'") from None
    from batchprod.state.database import selected_db

    stop = None
    if catalog is not None:
        from batchprod.cli_campaign import start_dispatcher

        stop = start_dispatcher(catalog)
    try:
        uvicorn.run(create_app(root or Path.cwd() / "submit", selected_db()), host=host, port=port,
                    log_level="warning")
    finally:
        if stop is not None:
            stop()


@main.command()
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True)
@DB_OPTION
@_user_errors
def runs(root: Path | None, as_json: bool) -> None:
    """List runs under the submit root, newest first."""
    from batchprod.report import summarize
    from batchprod.report.report import damaged_summary
    from batchprod.state.run import Run, list_runs

    rows = []
    for d in list_runs(root):
        try:
            rows.append(summarize(Run(d)))
        except BatchprodError as exc:  # one damaged run is flagged, not fatal for the listing
            rows.append(damaged_summary(d, str(d), exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from batchprod.report.progress import duration
    from batchprod.report.tables import fit_table

    headers = ["run", "status", "jobs", "succeeded", "failed", "started", "ended", "elapsed", "submit dir"]
    table = [[s["run"], s["status"], f"{s['jobs']['total']:,}", f"{s['jobs']['succeeded']:,}",
              f"{s['jobs']['failed']:,}", s.get("started") or "", s.get("ended") or "",
              duration(s["elapsed_s"] or 0), s["submit_dir"]] for s in rows]
    console.print(fit_table(f"runs under {root or Path.cwd() / 'submit'}", headers, table, console.width,
                            right=["jobs", "succeeded", "failed", "elapsed"], optional=["submit dir", "ended"]))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-run"))
@click.option("--visits", default=8, show_default=True, help="Number of visits.")
@click.option("--detectors", default=5, show_default=True, help="Detectors per visit.")
@click.option("--sources", default=40, show_default=True, help="Injected point sources.")
@_user_errors
def demo(directory: Path, visits: int, detectors: int, sources: int) -> None:
    """Make a synthetic sky survey, run the demo pipeline on it, and check the final catalog."""
    from batchprod.demo import check_catalog, make_demo
    from batchprod.engine.prepare import prepare as do_prepare

    config = make_demo(directory, visits=visits, detectors=detectors, n_sources=sources)
    console.print(f"demo data and config in {directory}")
    timings: list[Any] = []
    run = do_prepare(config, {}, timings)
    _print_prepare(run, timings)
    rc = _execute_foreground(run, show_progress=True)
    result = check_catalog(directory, run)
    style = "green" if result["ok"] else "red"
    console.print(f"catalog check: {result['message']}", style=style)
    sys.exit(rc or (0 if result["ok"] else 1))


@main.group()
def sites() -> None:
    """The site catalog (sites.yaml): WMS, capacity, downtimes and state of each compute site."""


def _mem(mb: int | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.1f}".removesuffix(".0") + " GB" if mb >= 1024 else f"{mb} MB"


@sites.command("show")
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--at", "at", default=None, metavar="TIME", help="State at this ISO 8601 time (default: now).")
@_user_errors
def sites_show(catalog: Path, as_json: bool, at: str | None) -> None:
    """Every site of a catalog: WMS, capacity, shared filesystem, weight, next downtime, state now."""
    from datetime import UTC, datetime

    from batchprod.campaign.sites import iso, load_catalog, parse_time
    from batchprod.errors import ConfigError
    from batchprod.report.tables import fit_table

    cat = load_catalog(catalog)
    try:
        now = datetime.now(UTC) if at is None else parse_time(at)
    except ValueError as exc:
        raise ConfigError(f"<command line> --at: {exc}") from None
    if as_json:
        click.echo(json.dumps({"catalog": str(catalog), "now": iso(now),
                               "sites": [s.to_json(now) for s in cat.sites.values()]}, indent=2))
        return
    headers = ["site", "wms", "cores", "memory", "max jobs", "shared fs", "opportunistic", "weight",
               "next downtime", "state"]
    rows = []
    for s in cat.sites.values():
        cap, nxt = s.capacity, s.next_downtime(now)
        down = "-" if nxt is None else nxt.describe()
        rows.append([s.name, s.wms, "-" if cap.cores is None else str(cap.cores), _mem(cap.memory_mb),
                     "-" if cap.max_jobs is None else f"{cap.max_jobs:,}", "yes" if s.shared_filesystem else "no",
                     "yes" if s.opportunistic else "no", f"{s.weight:g}", down, s.status_now(now).state.value])
    console.print(fit_table(f"sites in {catalog}", headers, rows, console.width,
                            right=["cores", "memory", "max jobs", "weight"], optional=["next downtime"]))


@sites.command("add-downtime")
@click.argument("catalog", type=click.Path(path_type=Path))
@click.argument("site")
@click.option("--start", required=True, help="ISO 8601 with a zone, e.g. 2026-12-01T08:00:00Z.")
@click.option("--end", required=True, help="ISO 8601 with a zone, after --start.")
@click.option("--reason", default="", help="Why (shown with the window).")
@_user_errors
def sites_add_downtime(catalog: Path, site: str, start: str, end: str, reason: str) -> None:
    """Add a scheduled downtime window to a site (the catalog file is rewritten atomically)."""
    from batchprod.campaign.sites import add_downtime

    window = add_downtime(catalog, site, start, end, reason)
    console.print(f"{catalog}: site {site}: downtime {window.describe()} added")


# the workload-management commands live in cli_campaign.py
main.add_command(cli_campaign.campaign)
main.add_command(cli_campaign.incidents)
sites.add_command(cli_campaign.sites_status)


if __name__ == "__main__":
    main()
