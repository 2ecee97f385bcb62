"""Test helpers shipped with the package (so every test suite and backend conformance test shares
them): a tiny data repository of text files and pipelines made of shell commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from batchprod.execution.run import REGISTRY_FILE
from batchprod.graph.registry import Registry


def make_toy_repo(
    root: str | Path,
    visits: Iterable[int] = (1, 2),
    detectors: Iterable[int] = (0, 1),
    overlaps: Mapping[tuple[int, int], Iterable[int]] | None = None,
    tract: int = 0,
) -> Path:
    """A repo with one text 'raw' per (visit, detector) and (visit, detector) -> (tract, patch) relations.

    ``overlaps`` maps (visit, detector) to the patches it overlaps; by default detector d overlaps patch d.
    """
    repo = Path(root)
    (repo / "raw").mkdir(parents=True, exist_ok=True)
    reg = Registry(repo / REGISTRY_FILE, create=True)
    reg.register_dataset_type("raw", ["visit", "detector"])
    rows, rels = [], []
    for v in visits:
        for d in detectors:
            rel = f"raw/raw_{v}_{d}.txt"
            (repo / rel).write_text(f"raw visit={v} detector={d}\n")
            rows.append(({"visit": v, "detector": d}, rel, None, None))
            patches = (overlaps or {}).get((v, d), [d]) if overlaps is not None else [d]
            rels.extend(({"visit": v, "detector": d}, {"tract": tract, "patch": p}) for p in patches)
    reg.insert_datasets("raw", "raw", rows)
    reg.insert_relations(["visit", "detector"], ["tract", "patch"], rels)
    reg.close()
    return repo


def command_task(dims: list[str], inputs: list[str], outputs: list[str], command: str | None = None) -> dict[str, Any]:
    """A pipeline task that concatenates its inputs into each output (or runs ``command``)."""
    if command is None:
        command = " && ".join(f"cat {{inputs.{inputs[0]}}} > {{outputs.{o}}} && echo {{label}} {{dataId}} >> {{outputs.{o}}}" for o in outputs)
    return {"command": command, "dimensions": dims, "inputs": inputs, "outputs": outputs}


TOY_PIPELINE: dict[str, Any] = {
    "tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"]),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }
}


def write_submit(
    directory: str | Path,
    pipeline: Mapping[str, Any] | None = None,
    repo: str | Path = "repo",
    **keys: Any,
) -> Path:
    """Write pipeline.yaml and submit.yaml into a directory; extra keyword args become top-level keys."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pipeline.yaml").write_text(yaml.safe_dump(dict(pipeline or TOY_PIPELINE), sort_keys=False))
    cfg: dict[str, Any] = {
        "pipelineYaml": "pipeline.yaml",
        "payload": {"payloadName": "toy", "repo": str(repo), "outputRun": "toy/run"},
        "submitPath": str(d / "submit" / "{outputRun}"),
        "requestMemory": 100,
    }
    for k, v in keys.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = d / "submit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- payloads with controlled misbehaviour (importable by the job runner) ------------------------------
def alloc_task(ctx: Any) -> None:
    """Allocate and touch ``config.mb`` MB (or ``config.mb_by_attempt[attempt]``), hold it, then write."""
    import os
    import time

    mb = int(ctx.config.get("mb", 10))
    buf = bytearray(mb * 2**20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    time.sleep(float(ctx.config.get("hold", 1.0)))
    for ref in ctx.outputs.values():
        ref.path.write_text(f"{ctx.label} {ctx.data_id} attempt {os.environ.get('BATCHPROD_ATTEMPT')}\n")


def memory_error_task(ctx: Any) -> None:
    raise MemoryError("cannot allocate the coadd buffer")


def abort_task(ctx: Any) -> None:
    import os

    os.abort()


def chained_error_task(ctx: Any) -> None:
    """Fails with a chained traceback: the cause (KeyError) is printed first."""
    try:
        {}["calib_dir"]
    except KeyError as exc:
        raise RuntimeError("task setup failed") from exc


# -- driving an orchestrator from outside ----------------------------------------------------------------
def start_orchestrator(submit_dir: str | Path, log: str | Path | None = None) -> Any:
    """Run a prepared run's orchestrator as its own process (as ``submit --detach`` does)."""
    import subprocess
    import sys

    out = open(log or Path(submit_dir) / "orchestrator.log", "ab")  # noqa: SIM115 (child owns it)
    try:
        return subprocess.Popen([sys.executable, "-m", "batchprod.cli", "_execute", str(submit_dir)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def wait_for(pred: Any, timeout: float = 30.0, interval: float = 0.02) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError("condition not reached in time")
