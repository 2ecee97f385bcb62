"""A run on disk: its submit directory (frozen config, graph, workflow, logs) and its state store.

Opening a run never plans anything (that is the engine's ``prepare``); it reads what prepare wrote and
what restart overrides changed since.
"""

from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from batchprod._time import iso_now
from batchprod.errors import ConfigError, RunError
from batchprod.execution.rundir import (
    CONFIG_FILE,
    HISTORY_FILE,
    LOG_DIR,
    OVERRIDES_FILE,
    QGRAPH_FILE,
    attempt_paths,
    load_workflow,
    read_overrides,
)
from batchprod.graph import QuantumGraph
from batchprod.state.database import DB_FILE, read_pointer, selected_db
from batchprod.state.store import STATE_FILE, StateStore, list_central_runs
from batchprod.workflow import GenericWorkflow
from batchprod.workflow.overrides import RESOURCE_FIELD


class Run:
    """An existing run: its submit directory, state store, and (lazily) its graph and workflow."""

    def __init__(self, submit_dir: str | Path) -> None:
        self.submit_dir = Path(submit_dir).resolve()
        if (self.submit_dir / STATE_FILE).is_file():
            self.store = StateStore(self.submit_dir / STATE_FILE)
        elif (self.submit_dir / DB_FILE).is_file():  # kept in a central database
            url, name, run_id = read_pointer(self.submit_dir)
            self.store = StateStore(url, run=run_id)
            info = self.store.run_info()
            if info["name"] != name:  # the same id in another database (or schema)
                self.store.close()
                raise RunError(f"{self.submit_dir}: run {run_id} of {self.store.where} is '{info['name']}' "
                               f"of {info['submit_dir']}, not this run ('{name}'): wrong database?")
        else:
            raise RunError(f"{submit_dir}: not a batchprod run (no {STATE_FILE} or {DB_FILE})")

    @cached_property
    def qgraph(self) -> QuantumGraph:
        return QuantumGraph.load(self.submit_dir / QGRAPH_FILE)

    @cached_property
    def workflow(self) -> GenericWorkflow:
        return load_workflow(self.submit_dir, self.qgraph)

    def restart_overrides(self) -> list[dict[str, Any]]:
        """Job values changed at restart (``restart -o``), oldest first; the frozen config stays as submitted."""
        return read_overrides(self.submit_dir)

    @cached_property
    def config(self) -> dict[str, Any]:
        path = self.submit_dir / CONFIG_FILE
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            raise RunError(f"{path}: damaged run config: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        if not isinstance(data, dict):
            raise RunError(f"{path}: damaged run config: not a mapping")
        return data

    @property
    def name(self) -> str:
        return str(self.store.run_info()["name"])

    @property
    def log_dir(self) -> Path:
        return self.submit_dir / LOG_DIR

    def attempt_paths(self, label: str, name: str, attempt: int | str) -> tuple[Path, Path, Path]:
        """stdout, stderr and result manifest of one attempt: logs/<label>/<name>.<attempt>.*"""
        return attempt_paths(self.submit_dir, label, name, attempt)

    def site(self, key: str, default: Any = None) -> Any:
        """A typed value from the run's compute-site section (``site.<computeSite>.<key>``)."""
        return site_value(self.config, key, default)

    def wms_name(self) -> str:
        return str(self.store.run_info()["wms"])


def site_value(config: dict[str, Any], key: str, default: Any = None, site: str | None = None) -> Any:
    """``site.<computeSite>.<key>`` of a config mapping, converted by the key table; ``default`` if unset."""
    from batchprod.config.keys import SITE_KEYS

    name = site or config.get("computeSite") or "local"
    section = (config.get("site") or {}).get(name) or {}
    return SITE_KEYS[key](section[key]) if key in section else default


def _is_run_dir(d: Path) -> bool:
    return (d / STATE_FILE).is_file() or (d / DB_FILE).is_file()


def find_run(ref: str | Path, submit_root: str | Path | None = None) -> Run:
    """A run by submit directory path or by name (relative to the submit root, default ./submit, or
    recorded in the central database selected by --db / $BATCHPROD_DB)."""
    p = Path(ref)
    if _is_run_dir(p):
        return Run(p)
    root = Path(submit_root) if submit_root else Path.cwd() / "submit"
    if _is_run_dir(root / ref):
        return Run(root / ref)
    db = selected_db()
    if db:
        named = [r["submit_dir"] for r in list_central_runs(db) if r["name"] == str(ref)]
        there = [d for d in named if _is_run_dir(Path(d))]
        if len(there) > 1:
            raise RunError(f"{len(there)} runs are named '{ref}' in {_public(db)}: give the submit directory "
                           f"({', '.join(there[:3])}{' ...' if len(there) > 3 else ''})")
        if there:
            return Run(there[0])
    # a run whose submitPath does not end in its name: found by the name 'runs' shows
    for d in list_runs(root):
        try:
            run = Run(d)
            found = run.name == str(ref)
            run.store.close()
            if found:
                return Run(d)
        except RunError:
            continue
    raise RunError(f"run '{ref}' not found (looked in {p}, {root / ref}"
                   f"{', the database ' + _public(db) if db else ''} and the runs under {root})")


def _public(url: str) -> str:
    from batchprod.state.database import public_url

    try:
        return public_url(url)
    except Exception:  # noqa: BLE001 (a URL that did not parse was refused earlier with its own line)
        return "given"


def list_runs(submit_root: str | Path | None = None) -> list[Path]:
    """Submit directories under the root (any depth), and runs of the central database selected by
    --db / $BATCHPROD_DB whose submit directory is under it, newest first."""
    root = Path(submit_root) if submit_root else Path.cwd() / "submit"
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if STATE_FILE in filenames or DB_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()  # never walk a run's own logs: a 200,000-job run has 600,000 files there
    db = selected_db()
    if db:
        seen = {d.resolve() for d in found}
        base = root.resolve()
        for r in list_central_runs(db):
            d = Path(r["submit_dir"]).resolve()
            if d not in seen and d.is_relative_to(base) and _is_run_dir(d):
                found.append(d)
                seen.add(d)

    def mtime(d: Path) -> float:
        for f in (STATE_FILE, DB_FILE):
            try:
                return (d / f).lstat().st_mtime
            except OSError:  # a dangling or vanished state file: listed (and flagged by whoever opens it), last
                continue
        return 0.0

    return sorted(found, key=mtime, reverse=True)


def add_restart_overrides(run: Run, overrides: dict[str, Any]) -> list[str]:
    """Validate ``restart -o KEY=VALUE`` (job values only: resources and retry policy, at the top level
    or under ``pipetask.<label>``, ``cluster.<name>``, ``finalJob``), record them in the run's history,
    and make them apply from now on. Returns one description per value."""
    from batchprod.config.keys import JOB_KEYS

    wf = run.workflow
    labels = {lab for g in wf.groups for lab in g.labels}
    clusters = {g.name for g in wf.groups}
    typed: dict[str, Any] = {}
    for dotted, raw in overrides.items():
        where = f"<command line> -o {dotted}"
        scope, _, key = dotted.rpartition(".")
        kind, _, name = scope.partition(".")
        if key not in RESOURCE_FIELD:
            import difflib

            close = difflib.get_close_matches(key, list(RESOURCE_FIELD), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: restart can change job values only{hint} "
                              f"({', '.join(sorted(RESOURCE_FIELD))}); anything else needs a new submission")
        if not ((kind == "" and not name) or (kind == "pipetask" and name in labels)
                or (kind == "cluster" and name in clusters) or (kind == "finalJob" and not name and wf.final)):
            raise ConfigError(f"{where}: no such scope '{scope}' in this run (task labels: {', '.join(sorted(labels))}; "
                              f"clusters: {', '.join(sorted(clusters))})")
        try:
            typed[dotted] = JOB_KEYS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if not typed:
        return []
    entries = [*run.restart_overrides(), {"time": time.time(), "values": typed}]
    path = run.submit_dir / OVERRIDES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, path)
    said = [f"{k}={v}" for k, v in typed.items()]
    with open(run.submit_dir / HISTORY_FILE, "a") as fh:
        fh.write(f"{iso_now()} restart -o {' -o '.join(said)}\n")
    run.__dict__.pop("workflow", None)  # apply from now on
    return said
