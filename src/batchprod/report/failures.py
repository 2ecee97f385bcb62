"""Failure analysis: failed jobs grouped by signature (class + normalized first error line), with
the causal error line and the tail of stderr per job, and one job's whole history."""

from __future__ import annotations

from typing import Any

from batchprod._time import plural
from batchprod.errors import RunError
from batchprod.execution.logs import signature
from batchprod.execution.paths import tail_in
from batchprod.execution.states import JobState
from batchprod.state.run import Run


def _data_id(run: Run, job_id: int) -> dict[str, Any]:
    wf = run.workflow
    if job_id >= len(wf):
        return {}
    g, quanta = wf.group(job_id), wf.quanta(job_id)
    if not len(quanta):  # a Rubin run's pipetaskInit job
        return {}
    did = run.qgraph.data_id(int(quanta[0]))
    for a, b in g.equal:  # (ctrl_bps equalDimensions: the job's quanta may name it the other way)
        did.setdefault(a, did.get(b))
    return {d: did.get(d) for d in g.dimensions}


def _cause(r: dict[str, Any]) -> str:
    """The line an operator acts on: the recorded causal line, else batchprod's message; never None."""
    return r["error_line"] or r["message"] or f"{r['failure_class']}: no message recorded"


def failures(run: Run, examples: int = 3, tail_lines: int = 5, limit: int | None = 50) -> dict[str, Any]:
    """Groups of failed jobs (largest first) and details of ``limit`` of them (None = all). Every
    group's first example is among the jobs shown, so no signature goes without one."""
    rows = run.store.last_attempts(JobState.FAILED)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    first_of: list[int] = []
    for i, r in enumerate(rows):
        cause = _cause(r)
        key = (str(r["failure_class"]), signature(cause))
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"failure_class": key[0], "signature": key[1], "count": 0, "labels": {},
                               "examples": [], "cause": cause}
            first_of.append(i)
        g["count"] += 1
        g["labels"][r["label"]] = g["labels"].get(r["label"], 0) + 1
        if len(g["examples"]) < examples:
            g["examples"].append(r["name"])
    if limit is None or limit >= len(rows):
        shown = list(range(len(rows)))
    else:
        chosen = set(first_of[:max(limit, len(first_of))])
        for i in range(len(rows)):
            if len(chosen) >= max(limit, len(first_of)):
                break
            chosen.add(i)
        shown = sorted(chosen)
    jobs = []
    for i in shown:
        r = rows[i]
        jobs.append({
            "name": r["name"], "label": r["label"], "data_id": _data_id(run, r["id"]),
            "failure_class": r["failure_class"], "exit_code": r["exit_code"], "signal": r["signal"],
            "attempts": r["attempts"], "request_memory": r["request_memory"], "message": r["message"],
            "cause": _cause(r),
            "error_line": r["error_line"], "stdout": r["stdout"], "stderr": r["stderr"],
            "stderr_tail": tail_in(run.submit_dir, r["stderr"], tail_lines),
        })
    unready = len(run.store.jobs(status=JobState.UNREADY))
    return {"failed": len(rows), "shown": len(jobs), "unready": unready,
            "groups": sorted(groups.values(), key=lambda g: -g["count"]), "jobs": jobs}


def job_history(run: Run, name: str) -> dict[str, Any]:
    job = run.store.job_by_name(name)
    if job is None:
        raise RunError(f"run '{run.name}': no job named '{name}'")
    attempts = run.store.attempts(job["id"])
    return {**job, "data_id": _data_id(run, job["id"]), "attempts_detail": attempts,
            "outputs": run.store.outputs(job["id"])}


def _exit_words(exit_code: Any, sig: Any) -> str:
    import signal as _signal

    if sig:
        try:
            return f"killed by {_signal.Signals(int(sig)).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {exit_code}" if exit_code is not None else "no exit code"


def _data_id_words(did: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in did.items()) or "-"


def render_failures(f: dict[str, Any], width: int | None = None) -> list[Any]:
    from batchprod.report.tables import fit_table

    if not f["failed"]:
        return [f"no failed jobs ({f['unready']:,} unready)" if f["unready"] else "no failed jobs"]
    out: list[Any] = []
    title = (f"{plural(f['failed'], 'failed job')} in {plural(len(f['groups']), 'failure signature')} "
             f"({f['unready']:,} unready downstream)")
    rows = [[f"{g['count']:,}", g["failure_class"], ", ".join(f"{k}: {v:,}" for k, v in g["labels"].items()),
             g["cause"], "\n".join(g["examples"])] for g in f["groups"]]
    out.append(fit_table(title, ["count", "class", "labels", "cause", "examples"], rows, width or 1_000_000,
                         right=["count"]))
    for j in f["jobs"]:
        lines = [f"[bold]{j['name']}[/bold]  {j['label']}  {_data_id_words(j['data_id'])}  {j['failure_class']}, "
                 f"{_exit_words(j['exit_code'], j['signal'])}, {plural(j['attempts'], 'attempt')}",
                 f"  cause: {j['cause']}"]
        if j["message"] and j["message"] != j["cause"]:
            lines.append(f"  batchprod: {j['message']}")
        if j["stderr_tail"]:
            lines.append(f"  stderr ({j['stderr']}):")
            lines.extend(f"    {ln}" for ln in j["stderr_tail"])
        else:
            lines.append(f"  stderr ({j['stderr']}): empty")
        out.append("\n".join(lines))
    if f["shown"] < f["failed"]:
        out.append(f"{f['shown']:,} of {plural(f['failed'], 'failed job')} shown (every signature has an example); "
                   "--all shows every one, --limit N a number")
    return out


def render_history(h: dict[str, Any]) -> list[Any]:
    """One job's history as lines (attempt rows are too wide for a terminal table)."""
    out: list[Any] = [f"[bold]{h['name']}[/bold]  label {h['label']}  {_data_id_words(h['data_id'])}  "
                      f"{h['status']}  {plural(h['attempts'], 'attempt')}  requestMemory {h['request_memory']:,} MB"]
    if h.get("message"):
        out.append(f"  {h['message']}")
    for a in h["attempts_detail"]:
        ended = a["status"] not in ("QUEUED", "RUNNING")
        how = ("succeeded" if a["status"] == "SUCCEEDED"
               else f"{a['failure_class'] or a['status'].lower()}, {_exit_words(a['exit_code'], a['signal'])}"
               if ended else a["status"].lower())
        use = [f"memory {a['request_memory']:,} MB" if a["request_memory"] is not None else None,
               f"peak {a['peak_rss_mb']:,.0f} MB" if a["peak_rss_mb"] is not None else None,
               f"cpu {a['cpu_s']:,.2f} s" if a["cpu_s"] is not None else None,
               f"wall {a['wall_s']:,.2f} s" if a["wall_s"] is not None else None,
               f"host {a['host']}" if a["host"] else None,
               f"handle {a['handle']}" if a.get("handle") else None]
        out.append(f"  attempt {a['number']}: {how}; " + ", ".join(u for u in use if u))
        if a["error_line"]:
            out.append(f"    cause: {a['error_line']}")
        if a["message"] and a["message"] != a["error_line"]:
            out.append(f"    batchprod: {a['message']}")
        out.append(f"    stdout: {a['stdout']}\n    stderr: {a['stderr']}")
    for o in h["outputs"]:
        size = f"{o['size']:,} B" if o["size"] is not None else "size unknown"
        out.append(f"  output {o['dataset_type']} {o['data_id']}: {o['path']} ({size}, {o['checksum'] or 'no checksum'})")
    return out
