"""Status report of a run, computed in SQL from the state store (never by scraping logs)."""

from __future__ import annotations

import time
from typing import Any

from batchprod._time import iso
from batchprod.engine import lock
from batchprod.execution.process import same_process_alive
from batchprod.execution.states import JobState, RunState
from batchprod.state.run import Run

COLUMNS = ("total", "succeeded", "failed", "running", "pending", "unready", "cancelled")

_COLUMN_OF = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.KILLED: "failed",
    JobState.RUNNING: "running",
    JobState.QUEUED: "running",
    JobState.PENDING: "pending",
    JobState.READY: "pending",
    JobState.HELD: "pending",
    JobState.UNREADY: "unready",
    JobState.CANCELLED: "cancelled",
}


def column_counts(counts: dict[str, int]) -> dict[str, int]:
    """Jobs per state -> jobs per report column (the words every view uses)."""
    out = dict.fromkeys(COLUMNS[1:], 0)
    for state, n in counts.items():
        out[_COLUMN_OF[JobState(state)]] += n
    return out


def run_status(run: Run, info: dict[str, Any] | None = None) -> str:
    """The run's state; RUNNING with no engine holding the run's lock is INTERRUPTED (its engine died)."""
    info = info or run.store.run_info()
    status = info["status"]
    if status == RunState.RUNNING and lock.is_free(run.submit_dir) and not same_process_alive(
            info.get("orchestrator_pid"), info.get("orchestrator_start")):
        return RunState.INTERRUPTED
    return str(status)


DAMAGED = "DAMAGED"


def damaged_summary(submit_dir: Any, name: str, exc: Exception) -> dict[str, Any]:
    """A run that cannot be read, in the shape of a summary (a listing flags it instead of failing)."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"run": name, "name": name, "submit_dir": str(submit_dir), "wms": None, "status": DAMAGED,
            "created": None, "elapsed_s": None, "message": line, "error": line, "jobs": dict.fromkeys(COLUMNS, 0),
            "labels": {}, "quanta": {}}


def restart_hint(run: Run) -> str:
    return f"batchprod restart {run.submit_dir}"


def _times(run: Run, info: dict[str, Any], status: str) -> tuple[float | None, float | None, float]:
    """(first start, last end, seconds an engine was executing it). Only engine sessions count: the
    idle days between a failure and its restart are not 'elapsed'. A session whose engine died ends
    at its last write."""
    sessions = run.store.executions()
    if not sessions:  # a run from before sessions were recorded, or never executed
        if status == RunState.PREPARED:
            return None, None, 0.0
        return info["created"], info["updated"], info["updated"] - info["created"]
    now = time.time()
    total, end = 0.0, None
    for i, e in enumerate(sessions):
        end = e["end"]
        if end is None:
            live = i == len(sessions) - 1 and status == RunState.RUNNING
            end = now if live else max(e.get("last_write") or e["start"], e["start"])
        total += max(0.0, end - e["start"])
    return sessions[0]["start"], (None if status == RunState.RUNNING else end), total


def summarize(run: Run) -> dict[str, Any]:
    """Per-label job counts (and quanta) plus a run-level summary, as plain data (for --json)."""
    info = run.store.run_info()
    labels: dict[str, dict[str, int]] = {}
    quanta: dict[str, dict[str, int]] = {}
    for label, status, n, nq in run.store.counts_by_label():
        col = _COLUMN_OF[JobState(status)]
        row = labels.setdefault(label, dict.fromkeys(COLUMNS, 0))
        qrow = quanta.setdefault(label, dict.fromkeys(COLUMNS, 0))
        row[col] += n
        row["total"] += n
        qrow[col] += nq
        qrow["total"] += nq
    totals = dict.fromkeys(COLUMNS, 0)
    for row in labels.values():
        for c in COLUMNS:
            totals[c] += row[c]
    status = run_status(run, info)
    started, ended, elapsed = _times(run, info, status)
    if status == RunState.INTERRUPTED:
        # its engine is gone: nothing runs, whatever the last rows said
        totals["interrupted"] = totals.pop("running")
        for row in labels.values():
            row["interrupted"] = row.pop("running")
    return {
        "run": info["name"],
        "submit_dir": info["submit_dir"],
        "wms": info["wms"],
        "status": status,
        "hint": restart_hint(run) if status == RunState.INTERRUPTED else None,
        "created": info["created"],
        "created_iso": iso(info["created"]),
        "started": iso(started),
        # an engine that died did not end the run: when it was last seen is not when the run ended
        "ended": iso(None if status == RunState.INTERRUPTED else ended),
        "last_seen": iso(ended) if status == RunState.INTERRUPTED else None,
        "elapsed_s": round(elapsed, 3),
        "message": info["message"],  # e.g. the post-run ingest's outcome
        "jobs": totals,
        "labels": labels,
        "quanta": quanta,
    }


def render_table(summary: dict[str, Any], width: int | None = None) -> Any:
    """The per-label counts as a table that fits ``width`` uncut (None = no limit), with the run's
    message and, for an interrupted run, the command that continues it below."""
    from batchprod.report.tables import fit_table

    cols = [("interrupted" if c == "running" and "interrupted" in summary["jobs"] else c) for c in COLUMNS]
    from batchprod.report.progress import duration

    title = f"run {summary['run']}: {summary['status']}  (wms={summary['wms']})"
    rows = [[label, *(f"{row[c]:,}" for c in cols)] for label, row in summary["labels"].items()]
    footer = ["all jobs", *(f"{summary['jobs'][c]:,}" for c in cols)]
    t = fit_table(title, ["label", *cols], rows, width or 1_000_000, right=cols, footer=footer)
    when = [f"started {summary['started']}" if summary.get("started") else "not started yet"]
    if summary.get("ended"):
        when.append(f"ended {summary['ended']}")
    elif summary.get("last_seen"):
        when.append(f"engine last seen {summary['last_seen']}")
    when.append(f"elapsed {duration(summary['elapsed_s'])} (while an engine ran it)")
    notes = [", ".join(when), *(summary[k] for k in ("message",) if summary.get(k))]
    if summary.get("hint"):
        notes.append(f"its engine is gone; continue with: {summary['hint']}")
    from rich.console import Group
    from rich.text import Text

    # below the table, not in its caption: a caption is wrapped to the table's width, cutting paths
    return Group(t, *(Text(n, overflow="fold") for n in notes))


def restart_plan(run: Run) -> tuple[str, int]:
    """What a restart is about to do, in words (kept N succeeded, re-running M, learned memory of K
    kept), and how many jobs it will run."""
    from batchprod._time import plural

    wf = run.workflow
    base = [g.resources.request_memory for g in wf.groups]
    groups = wf.job_group.tolist()
    final_mem = wf.final.resources.request_memory if wf.final is not None else 0
    kept = rerun = learned = 0
    final_pending = False
    for j, status, mem in run.store.job_columns("id", "status", "request_memory"):
        if j >= len(groups):  # the final job: it runs again at the end of any execution that runs a job
            final_pending = status != JobState.SUCCEEDED
            if mem > final_mem:
                learned += 1
            continue
        if status == JobState.SUCCEEDED:
            kept += 1
            continue
        rerun += 1
        if mem > base[groups[j]]:
            learned += 1
    if wf.final is not None and (rerun or final_pending):
        rerun += 1
        kept_words = f"kept {plural(kept, 'succeeded job')}"
        run_words = f"re-running {plural(rerun - 1, 'job')} and the final job" if rerun > 1 else \
            "re-running the final job"
    else:
        kept += wf.final is not None  # a finished run's final job: nothing runs, so it is kept too
        kept_words, run_words = f"kept {plural(kept, 'succeeded job')}", f"re-running {plural(rerun, 'job')}"
    parts = [kept_words, run_words]
    if learned:
        parts.append(f"learned memory of {plural(learned, 'job')} kept")
    info = run.store.run_info()
    if not rerun and info["status"] == RunState.SUCCEEDED:
        from batchprod.engine.orchestrator import INGEST_FAILED

        if (info["message"] or "").startswith(INGEST_FAILED):
            return f"restart: all {plural(kept, 'job')} succeeded; repeating the registry ingest that failed", 1
        return f"restart: nothing to do, all {plural(kept, 'job')} of {run.name} succeeded (changed nothing)", 0
    return "restart: " + ", ".join(parts), max(rerun, 1)  # (an engine that died before the end: finish it)
