"""Failure analysis: failed jobs grouped by signature (class + normalized first error line), with
the causal error line and the tail of stderr per job, and one job's whole history."""

from __future__ import annotations

from typing import Any

from batchprod.errors import RunError
from batchprod.execution.logs import signature, tail
from batchprod.execution.run import Run
from batchprod.execution.states import JobState


def _data_id(run: Run, job_id: int) -> dict[str, Any]:
    wf = run.workflow
    if job_id >= len(wf):
        return {}
    g = wf.group(job_id)
    did = run.qgraph.data_id(int(wf.quanta(job_id)[0]))
    return {d: did[d] for d in g.dimensions}


def failures(run: Run, examples: int = 3, tail_lines: int = 5, max_jobs: int = 50) -> dict[str, Any]:
    """Groups of failed jobs (largest first) and details of up to ``max_jobs`` of them."""
    rows = run.store.last_attempts(JobState.FAILED)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (str(r["failure_class"]), signature(r["error_line"] or r["message"]))
        g = groups.setdefault(key, {"failure_class": key[0], "signature": key[1], "count": 0, "labels": {},
                                    "examples": [], "error_line": r["error_line"] or r["message"]})
        g["count"] += 1
        g["labels"][r["label"]] = g["labels"].get(r["label"], 0) + 1
        if len(g["examples"]) < examples:
            g["examples"].append(r["name"])
    jobs = []
    for r in rows[:max_jobs]:
        jobs.append({
            "name": r["name"], "label": r["label"], "data_id": _data_id(run, r["id"]),
            "failure_class": r["failure_class"], "exit_code": r["exit_code"], "signal": r["signal"],
            "attempts": r["attempts"], "request_memory": r["request_memory"], "message": r["message"],
            "error_line": r["error_line"], "stderr": r["stderr"], "stderr_tail": tail(r["stderr"], tail_lines),
        })
    unready = len(run.store.jobs(status=JobState.UNREADY))
    return {"failed": len(rows), "unready": unready,
            "groups": sorted(groups.values(), key=lambda g: -g["count"]), "jobs": jobs}


def job_history(run: Run, name: str) -> dict[str, Any]:
    job = run.store.job_by_name(name)
    if job is None:
        raise RunError(f"run '{run.name}': no job named '{name}'")
    attempts = run.store.attempts(job["id"])
    return {**job, "data_id": _data_id(run, job["id"]), "attempts_detail": attempts,
            "outputs": run.store.outputs(job["id"])}


def render_failures(f: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    out: list[Any] = []
    t = Table(title=f"{f['failed']} failed jobs in {len(f['groups'])} failure signatures ({f['unready']} unready downstream)")
    for c in ("count", "class", "labels", "first error line", "examples"):
        t.add_column(c, overflow="fold")
    for g in f["groups"]:
        t.add_row(str(g["count"]), g["failure_class"], ", ".join(f"{k}:{v}" for k, v in g["labels"].items()),
                  g["error_line"] or "", ", ".join(g["examples"]))
    out.append(t)
    for j in f["jobs"]:
        sig = f" signal {j['signal']}" if j["signal"] else ""
        out.append(f"[bold]{j['name']}[/bold] {j['label']} {j['data_id']} class={j['failure_class']} "
                   f"exit={j['exit_code']}{sig} attempts={j['attempts']}\n  cause: {j['error_line']}\n  "
                   f"{j['message']}\n  stderr ({j['stderr']}):\n    " + "\n    ".join(j["stderr_tail"]))
    return out


def render_history(h: dict[str, Any]) -> list[Any]:
    """One job's history as lines (attempt rows are too wide for a terminal table)."""
    out: list[Any] = [f"[bold]{h['name']}[/bold] label={h['label']} data_id={h['data_id']} status={h['status']} "
                      f"attempts={h['attempts']} requestMemory={h['request_memory']} MB"]
    if h.get("message"):
        out.append(f"  {h['message']}")
    for a in h["attempts_detail"]:
        sig = f" signal={a['signal']}" if a["signal"] else ""
        out.append(
            f"  attempt {a['number']}: {a['status']} class={a['failure_class'] or '-'} exit={a['exit_code']}{sig} "
            f"mem={a['request_memory']} MB peak={a['peak_rss_mb'] or 0:.0f} MB cpu={a['cpu_s'] or 0:.2f}s "
            f"wall={a['wall_s'] or 0:.2f}s host={a['host']} handle={a.get('handle')}")
        if a["error_line"]:
            out.append(f"    cause: {a['error_line']}")
        if a["message"]:
            out.append(f"    {a['message']}")
        out.append(f"    stdout: {a['stdout']}\n    stderr: {a['stderr']}")
    for o in h["outputs"]:
        out.append(f"  output {o['dataset_type']} {o['data_id']}: {o['path']} ({o['size']} B, {o['checksum']})")
    return out
