"""Status report of a run, computed in SQL from the state store (never by scraping logs)."""

from __future__ import annotations

import time
from typing import Any

from batchprod.execution.process import same_process_alive
from batchprod.execution.run import Run
from batchprod.execution.states import JobState, RunState

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


def run_status(run: Run) -> str:
    """The run's state; RUNNING with no live orchestrator is reported as INTERRUPTED."""
    info = run.store.run_info()
    status = info["status"]
    if status == RunState.RUNNING and not same_process_alive(info.get("orchestrator_pid"), info.get("orchestrator_start")):
        return RunState.INTERRUPTED
    return str(status)


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
    end = info["updated"] if info["status"] != RunState.RUNNING else time.time()
    return {
        "run": info["name"],
        "submit_dir": info["submit_dir"],
        "wms": info["wms"],
        "status": run_status(run),
        "created": info["created"],
        "elapsed_s": round(end - info["created"], 3),
        "message": info["message"],  # e.g. the post-run ingest's outcome
        "jobs": totals,
        "labels": labels,
        "quanta": quanta,
    }


def render_table(summary: dict[str, Any]) -> Any:
    """A rich Table of the per-label counts."""
    from rich.table import Table

    t = Table(title=f"run {summary['run']}: {summary['status']}  ({summary['elapsed_s']:.1f}s, wms={summary['wms']})")
    t.add_column("label")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for label, row in summary["labels"].items():
        t.add_row(label, *(str(row[c]) for c in COLUMNS))
    t.add_section()
    t.add_row("all jobs", *(str(summary["jobs"][c]) for c in COLUMNS), style="bold")
    if summary.get("message"):
        t.caption = summary["message"]
    return t
