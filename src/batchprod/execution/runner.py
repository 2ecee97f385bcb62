"""The job wrapper's in-job step: run every quantum of one job and write a result manifest.

Started as ``python -m batchprod.execution.runner`` with the job spec (JSON) on stdin. Each quantum
runs its Python function or shell command; outputs are checked, measured and checksummed here, on the
compute side, so the orchestrator only reads a small manifest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from batchprod.pipeline.context import QuantumContext, Ref

#: exit code for a payload that raised MemoryError: the wrapper reports it as an OOM
EXIT_MEMORY_ERROR = 86
#: exit code when a quantum claims success but did not write an output
EXIT_MISSING_OUTPUT = 87


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_function(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _context(q: dict[str, Any]) -> QuantumContext:
    inputs: dict[str, list[Ref]] = {}
    for r in q["inputs"]:
        inputs.setdefault(r["dataset_type"], []).append(Ref(r["dataset_type"], r["data_id"], Path(r["path"])))
    outputs = {r["dataset_type"]: Ref(r["dataset_type"], r["data_id"], Path(r["path"])) for r in q["outputs"]}
    return QuantumContext(q["label"], q["data_id"], inputs, outputs, q.get("config") or {})


def render_command(template: str, q: dict[str, Any]) -> str:
    """Fill a command template: {inputs.TYPE}, {outputs.TYPE}, {config.KEY}, {dataId}, {<dimension>}."""
    ins: dict[str, list[str]] = {}
    for r in q["inputs"]:
        ins.setdefault(r["dataset_type"], []).append(shlex.quote(r["path"]))
    fields: dict[str, Any] = {
        "inputs": SimpleNamespace(**{k: " ".join(v) for k, v in ins.items()}),
        "outputs": SimpleNamespace(**{r["dataset_type"]: shlex.quote(r["path"]) for r in q["outputs"]}),
        "config": SimpleNamespace(**(q.get("config") or {})),
        "dataId": " ".join(f"{k}={v}" for k, v in q["data_id"].items()),
        "label": q["label"],
        **q["data_id"],
    }
    return template.format_map(fields)


def run_quantum(q: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one quantum; returns its output records. Raises on failure."""
    for r in q["outputs"]:
        Path(r["path"]).parent.mkdir(parents=True, exist_ok=True)
    if q.get("python"):
        load_function(q["python"])(_context(q))
    else:
        cmd = render_command(q["command"], q)
        print(f"+ {cmd}", flush=True)
        rc = subprocess.call(cmd, shell=True)
        if rc != 0:
            print(f"error: {q['label']} {q['data_id']}: command exited with code {rc}: {cmd}", file=sys.stderr)
            raise SystemExit(rc if rc > 0 else 128 - rc)
    out = []
    for r in q["outputs"]:
        p = Path(r["path"])
        if not p.is_file():
            print(f"error: {q['label']} {q['data_id']}: output '{r['dataset_type']}' was not written: {p}", file=sys.stderr)
            raise SystemExit(EXIT_MISSING_OUTPUT)
        out.append({**r, "node_id": q["node_id"], "size": p.stat().st_size, "checksum": file_checksum(p)})
    return out


def main() -> int:
    spec = json.loads(sys.stdin.read())
    result_path = spec.get("result_path")
    outputs: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        if spec.get("final"):
            final = spec["final"]
            if final.get("python"):
                load_function(final["python"])(spec)
            else:
                rc = subprocess.call(final["command"], shell=True)
                if rc != 0:
                    return rc if rc > 0 else 128 - rc
        for q in spec["quanta"]:
            print(f"quantum {q['label']} {q['data_id']}", flush=True)
            outputs.extend(run_quantum(q))
    except MemoryError:
        traceback.print_exc()
        return EXIT_MEMORY_ERROR
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    if result_path:
        tmp = result_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"outputs": outputs, "seconds": time.time() - t0, "pid": os.getpid()}, fh)
        os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
