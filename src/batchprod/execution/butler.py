"""The Butler job protocol: a Rubin job's success and outputs are the Butler's, not files of ours.

A Rubin job runs ``pipetask run-qbb REPO GRAPH --qgraph-node-id ID[,ID...]`` (or ``pre-exec-init-qbb``
for the pipetaskInit job). Its outputs go into the Butler's datastore; nothing is staged, checksummed
or published by batchprod. Success and failure come from the exit code and the ``--summary`` file
the protocol asks ``run-qbb`` to write per attempt (``<attempt>.summary.json``: a status per
quantum). The attempt's committed result (``result.json``) records the quanta's node ids, data IDs,
statuses and the dataset references they produced (dataset type, data ID, output run), so provenance
names them; the Butler itself holds the datasets (``butler query-datasets``).

No lsst code is imported: the summary is plain JSON.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchprod.execution.base import JobProtocol
from batchprod.execution.protocol import EXIT_INFRASTRUCTURE, _write_json, manifest_outputs, read_json

#: quantum statuses of a run-qbb summary that count as done (skipped: it had succeeded before)
DONE = frozenset({"success", "skipped"})


def summary_path(result_path: str | Path) -> str:
    """Where an attempt's ``run-qbb --summary`` goes: next to its result manifest."""
    return str(result_path).removesuffix(".result.json") + ".summary.json"


def read_summary(path: str | Path) -> list[dict[str, Any]] | None:
    """The per-quantum reports of a summary file; None if it is missing or unreadable."""
    data = read_json(path)
    reports = data.get("quantaReports") if isinstance(data, dict) else None
    return [r for r in reports if isinstance(r, dict)] if isinstance(reports, list) else None


def _data_id_text(d: Any) -> str:
    if isinstance(d, dict):
        return "{" + ", ".join(f"{k}: {v!r}" for k, v in d.items()) + "}"
    return str(d)


def failed_quantum_line(reports: list[dict[str, Any]]) -> str | None:
    """The operator's line for a failed Rubin job: the first failed quantum's task, data ID and error."""
    for r in reports:
        if r.get("status") not in DONE:
            info = r.get("exceptionInfo") or {}
            if isinstance(info, dict):
                kind = str(info.get("className") or info.get("type") or "").rsplit(".", 1)[-1]
                msg = str(info.get("message") or "").strip()
                what = f"{kind}: {msg}" if kind and msg else kind or msg
            else:
                what = str(info)
            status = r.get("status", "failed")
            head = f"{r.get('taskLabel', '?')} {_data_id_text(r.get('dataId'))}"
            first = what.splitlines()[0] if what.strip() else f"{status}, no error recorded"
            return f"{head}: {first}" if status == "failure" else f"{head}: {status}: {first}"
    return None


def butler_outputs(spec: dict[str, Any], reports: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Dataset references the job's quanta produced: (dataset type, data ID) in the output run, per
    quantum node id (the Butler holds them; ``path`` names the run in the repository)."""
    done = None if reports is None else {str(r.get("quantumId")) for r in reports if r.get("status") in DONE}
    where = f"butler:{spec.get('repo', '')}#{spec.get('output_run', '')}"
    out = []
    for q in spec["quanta"]:
        if done is not None and q["node_id"] not in done and len(done) < len(spec["quanta"]):
            continue  # (a summary without quantum ids for skipped quanta still counts them done)
        for dt in q.get("datasets") or ():
            out.append({"node_id": q["node_id"], "dataset_type": dt, "data_id": q["data_id"], "path": where,
                        "size": None, "checksum": None})
    return out


class ButlerJobs(JobProtocol):
    """Rubin jobs: exit code + ``--summary``; outputs in the Butler."""

    name = "butler"

    def post_job(self, spec: dict[str, Any], stderr: Path, staged: dict[str, str],
                 started: float) -> tuple[int, list[dict[str, Any]] | None]:
        result = spec["result_path"]
        reports = read_summary(summary_path(result)) if spec.get("quanta") else []
        if reports is not None:
            bad = failed_quantum_line(reports)
            if bad is not None:  # exit 0 yet a quantum did not succeed: a failure all the same
                with contextlib.suppress(OSError), open(stderr, "a") as fh:
                    fh.write(f"error: {bad}\n")
                return 1, None
        outputs = butler_outputs(spec, reports)
        manifest = {"outputs": outputs, "seconds": time.time() - started, "attempt": spec.get("attempt"),
                    "quanta": [{"node_id": q["node_id"], "label": q["label"], "data_id": q["data_id"]}
                               for q in spec["quanta"]]}
        try:
            _write_json(result, manifest, durable=False)
        except OSError as exc:
            with contextlib.suppress(OSError), open(stderr, "a") as fh:
                fh.write(f"error: stage-out: cannot write the result manifest {result}: {exc}\n")
            return EXIT_INFRASTRUCTURE, None
        with contextlib.suppress(OSError):
            os.unlink(f"{result}.exit")
        return 0, outputs

    def outputs(self, result: Path) -> list[dict[str, Any]] | None:
        return manifest_outputs(result, when_absent=None)

    def recover(self, result: Path, spec: Callable[[], dict[str, Any]]) -> list[dict[str, Any]] | None:
        if not result.exists() and Path(f"{result}.exit").exists():
            with contextlib.suppress(OSError):
                if Path(f"{result}.exit").read_text().strip() == "0":
                    s = spec()
                    self.post_job(s, Path(os.devnull), {}, time.time())
        return self.outputs(result)

    def cause(self, result: Path) -> str | None:
        reports = read_summary(summary_path(result))
        return None if reports is None else failed_quantum_line(reports)
