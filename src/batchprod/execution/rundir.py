"""The run directory's layout: which file is where, for the engine and the node-side wrapper alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchprod.errors import RunError
from batchprod.graph import QuantumGraph
from batchprod.workflow import GenericWorkflow
from batchprod.workflow.overrides import apply_overrides

QGRAPH_FILE = "qgraph.bpqg"
WORKFLOW_FILE = "workflow.bpwf"
CONFIG_FILE = "config.yaml"
REGISTRY_FILE = "registry.db"
LOG_DIR = "logs"
OVERRIDES_FILE = "overrides.json"  # job values changed by 'restart -o', applied over the frozen workflow
HISTORY_FILE = "history.log"  # what was done to the run besides executing it (replace, restart overrides)


def attempt_paths(submit_dir: Path, label: str, name: str, attempt: int | str) -> tuple[Path, Path, Path]:
    """stdout, stderr and result manifest of one attempt: logs/<label>/<name>.<attempt>.*"""
    d = submit_dir / LOG_DIR / label
    return d / f"{name}.{attempt}.out", d / f"{name}.{attempt}.err", d / f"{name}.{attempt}.result.json"


def read_overrides(submit_dir: Path) -> list[dict[str, Any]]:
    """Job values changed at restart (``restart -o``), oldest first; the frozen config stays as submitted."""
    path = submit_dir / OVERRIDES_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: damaged restart overrides: {exc}") from None
    if not isinstance(data, list):
        raise RunError(f"{path}: damaged restart overrides: expected a list")
    return data


def load_workflow(submit_dir: Path, qgraph: QuantumGraph | None = None) -> GenericWorkflow:
    """The run's workflow as it stands now: the frozen one with every restart override applied."""
    qg = qgraph if qgraph is not None else QuantumGraph.load(submit_dir / QGRAPH_FILE)
    wf = GenericWorkflow.load(submit_dir / WORKFLOW_FILE, qg)
    for entry in read_overrides(submit_dir):
        apply_overrides(wf, entry["values"])
    return wf
