"""Damaged or tampered run files are reported as one line naming the file, never a traceback.

A finished toy run is damaged in one way per test (state store: garbage, truncated, empty, a table or
the run row gone, a job row deleted, an unknown status; graph and workflow: indices out of range,
truncated or resized arrays, a bad header), then read by the CLI and the library.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sqlite3
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batchprod._arrayfile import load_arrays, save_arrays
from batchprod.errors import GraphError, WorkflowError
from batchprod.execution.paths import OutsideRunError, open_in, tail_in
from batchprod.execution.rundir import QGRAPH_FILE, WORKFLOW_FILE
from batchprod.graph.quantum_graph import QuantumGraph
from batchprod.state.run import Run
from batchprod.state.store import DamagedStateError, StateStore
from batchprod.testing import write_submit
from batchprod.workflow.generic import GenericWorkflow

JOB = "calibrate_visit1_detector0"


@pytest.fixture
def run_dir(tmp_path: Path, toy_repo: Path, cli) -> Path:
    assert cli("submit", write_submit(tmp_path, repo=toy_repo)).exit_code == 0
    sd = tmp_path / "submit" / "toy" / "run"
    gc.collect()  # connections the in-process CLI left in pools: closed, so the checkpoint is not busy
    with sqlite3.connect(sd / "state.db") as db:  # everything in the main file, nothing in a WAL
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    db.close()
    assert busy == 0 and not (sd / "state.db-wal").exists() or (sd / "state.db-wal").stat().st_size == 0
    return sd


def one_line_error(result, *fragments: str) -> str:
    """The CLI said exactly one line, an error, holding each fragment; exit code 2."""
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("error: "), out
    for f in fragments:
        assert f in out, (f, out)
    return out


def sql(sd: Path, statement: str) -> None:
    with sqlite3.connect(sd / "state.db") as db:
        db.execute(statement)
    db.close()


# -- the state store ---------------------------------------------------------------------------------
def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(8192))


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _short(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:50])


@pytest.mark.parametrize("damage,reason", [
    (_garbage, "file is not a database"),
    (_truncated, "truncated ("),
    (_empty, "empty file"),
    (_short, "truncated (50 bytes)"),
])
def test_damaged_state_file(run_dir: Path, cli, damage: Callable[[Path], None], reason: str) -> None:
    db = run_dir / "state.db"
    damage(db)
    before = db.read_bytes()
    for args in (("report", run_dir), ("report", run_dir, "--json"), ("report", run_dir, "--failures"),
                 ("restart", run_dir), ("provenance", run_dir, "calexp:visit=1,detector=0")):
        one_line_error(cli(*args), f"{db}: damaged run state: {reason}")
    assert db.read_bytes() == before  # reading a damaged store never writes to it


@pytest.mark.parametrize("statement,reason", [
    ("DROP TABLE job", "no 'job' table"),
    ("DELETE FROM run", "no run row"),
    ("UPDATE run SET status = 'EXPLODED'", "unknown run status 'EXPLODED'"),
    ("UPDATE run SET created = 'yesterday'", "run row: bad created 'yesterday'"),
    ("DELETE FROM job WHERE id = 2", "job 2 of 6 is missing (1 job rows deleted?)"),
    ("DELETE FROM job WHERE id = 0", "job 0 of 6 is missing (1 job rows deleted?)"),
    ("INSERT INTO job (run_id, id, name, label, n_quanta, priority, status, attempts, retries, preemptions,"
     " infra_failures, request_memory) VALUES (1, 99, 'extra', 'x', 1, 0, 'PENDING', 0, 0, 0, 0, 1)",
     "job row with id 99 beyond the run's 6 jobs"),
    (f"UPDATE job SET status = 'EXPLODED' WHERE name = '{JOB}'", f"job '{JOB}' has unknown status 'EXPLODED'"),
    ("UPDATE context SET record = 'not json'", "not a JSON object"),
])
def test_tampered_state_rows(run_dir: Path, cli, statement: str, reason: str) -> None:
    db = run_dir / "state.db"
    sql(run_dir, statement)
    commands = [("report", run_dir), ("report", run_dir, "--json"), ("restart", run_dir)]
    if "context" in statement:
        commands = [("provenance", run_dir, "calexp:visit=1,detector=0", "--json")]
    for args in commands:
        one_line_error(cli(*args), f"{db}: damaged run state: ", reason)


def test_unknown_status_is_caught_by_every_job_read(run_dir: Path) -> None:
    store = StateStore(run_dir / "state.db")  # sound when opened (opening checks too), tampered after
    sql(run_dir, f"UPDATE job SET status = 'EXPLODED' WHERE name = '{JOB}'")
    for read in (store.jobs, store.counts_by_label, lambda: store.job_columns("id", "status"),
                 lambda: store.job_by_name(JOB)):
        with pytest.raises(DamagedStateError, match=f"job '{JOB}' has unknown status 'EXPLODED'"):
            read()
    assert len(store.jobs(status="SUCCEEDED")) == 5  # a read that filters on known statuses still works
    store.close()


def test_a_sound_store_passes_every_check(run_dir: Path) -> None:
    store = StateStore(run_dir / "state.db")
    assert len(store.jobs()) == len(store.job_columns("id", "status")) == store.run_info()["n_jobs"] == 6
    assert sum(n for _, _, n, _ in store.counts_by_label()) == 6
    store.close()


# -- graph and workflow files ------------------------------------------------------------------------
def _tamper(path: Path, change: Callable[[dict, dict], None]) -> None:
    header, arrays = load_arrays(path)
    change(header, arrays)
    save_arrays(path, header, arrays)


def _cut_member(path: Path, member: str) -> None:
    """Rewrite the zip with one array's bytes cut short (a consistent zip around a truncated array)."""
    with zipfile.ZipFile(path) as zf:
        items = {n: zf.read(n) for n in zf.namelist()}
    items[member] = items[member][:-12]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for n, data in items.items():
            zf.writestr(n, data)
    path.write_bytes(buf.getvalue())


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict, dict], None]:
    def change(_header: dict, arrays: dict) -> None:
        arrays[name] = fn(arrays[name].copy())
    return change


def _poke(i: int, value: int) -> Callable[[np.ndarray], np.ndarray]:
    def fn(a: np.ndarray) -> np.ndarray:
        a[i] = value
        return a
    return fn


GRAPH_DAMAGE = {
    "pred_idx out of range": (_set("pred_idx", _poke(0, 10**6)), "array 'pred_idx': index 1000000 out of range"),
    "negative ext_idx": (_set("ext_idx", _poke(0, -3)), "array 'ext_idx': index -3 out of range"),
    "cycle": (_set("pred_idx", _poke(-1, 5)), "which does not come before it"),
    "task_offsets cut": (_set("task_offsets", lambda a: a[:-1]), "array 'task_offsets'"),
    "pred_ptr cut": (_set("pred_ptr", lambda a: a[:-2]), "array 'pred_ptr': 5 entries, expected 7"),
    "pred_ptr decreasing": (_set("pred_ptr", _poke(1, 5)), "array 'pred_ptr': row"),
    "data_ids resized": (_set("data_ids_0", lambda a: a[:-1]), "array 'data_ids_0': shape (3, 2)"),
    "floats": (_set("ext_idx", lambda a: a.astype(float)), "expected 1-d integers, found 1-d float64"),
    "array missing": (lambda h, a: a.pop("ext_ptr"), "no array 'ext_ptr'"),
    "bad task header": (lambda h, a: h["tasks"][0].update(dimensions=7), "bad header"),
    "bad registry inputs": (lambda h, a: h.update(ext_datasets=[[1, 2]] * len(h["ext_datasets"])), "bad header"),
}


@pytest.mark.parametrize("case", sorted(GRAPH_DAMAGE))
def test_tampered_graph(run_dir: Path, cli, case: str) -> None:
    path = run_dir / QGRAPH_FILE
    change, reason = GRAPH_DAMAGE[case]
    _tamper(path, change)
    with pytest.raises(GraphError, match="damaged quantum graph") as exc:
        QuantumGraph.load(path)
    assert str(exc.value).startswith(f"{path}: damaged quantum graph: ") and reason in str(exc.value)
    one_line_error(cli("report", run_dir, "--job", JOB), f"{path}: damaged quantum graph: ", reason)
    one_line_error(cli("provenance", run_dir, "calexp:visit=1,detector=0"), f"{path}: damaged quantum graph: ")


@pytest.mark.parametrize("damage,reason", [
    (lambda p: _cut_member(p, "pred_idx.npy"), "array 'pred_idx': 4 bytes of data for shape (4,) of int32 (16 bytes): truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable array file"),
    (_garbage, "not a readable array file"),
    (lambda p: _cut_member(p, "header.json"), "bad header"),
])
def test_truncated_or_garbage_graph_file(run_dir: Path, cli, damage: Callable[[Path], None], reason: str) -> None:
    path = run_dir / QGRAPH_FILE
    damage(path)
    one_line_error(cli("report", run_dir, "--job", JOB), f"{path}: cannot read quantum graph: ", reason)


def test_a_huge_declared_array_is_refused_before_it_is_allocated(run_dir: Path) -> None:
    path = run_dir / QGRAPH_FILE
    with zipfile.ZipFile(path) as zf:
        items = {n: zf.read(n) for n in zf.namelist()}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    items["pred_idx.npy"] = buf.getvalue() + b"\0" * 16
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in items.items():
            zf.writestr(n, data)
    with pytest.raises(GraphError, match=r"array 'pred_idx': 16 bytes of data for shape \(1000000000000,\)"):
        QuantumGraph.load(path)


WORKFLOW_DAMAGE = {
    "job_qidx out of range": (_set("job_qidx", _poke(0, 99)), "array 'job_qidx': index 99 out of range"),
    "dep_idx out of range": (_set("dep_idx", _poke(0, 42)), "array 'dep_idx': index 42 out of range"),
    "job_group out of range": (_set("job_group", _poke(0, 9)), "array 'job_group': index 9 out of range"),
    "dep_ptr cut": (_set("dep_ptr", lambda a: a[:3]), "array 'dep_ptr': 3 entries, expected 7"),
    "job without quanta": (_set("job_qptr", _poke(1, 0)), "damaged workflow: job 0 runs no quantum"),
    "2-d array": (_set("job_group", lambda a: a.reshape(2, -1)), "expected 1-d integers, found 2-d"),
    "bad resources": (lambda h, a: h["groups"][0]["resources"].update(request_memory="lots"),
                      "bad header (resource request_memory = 'lots')"),
    "unknown resource": (lambda h, a: h["groups"][0]["resources"].update(gpus=2), "bad header"),
    "bad run": (lambda h, a: h.update(run=[]), "bad header (run)"),
}


@pytest.mark.parametrize("case", sorted(WORKFLOW_DAMAGE))
def test_tampered_workflow(run_dir: Path, cli, case: str) -> None:
    path = run_dir / WORKFLOW_FILE
    change, reason = WORKFLOW_DAMAGE[case]
    _tamper(path, change)
    with pytest.raises(WorkflowError, match="damaged workflow"):
        GenericWorkflow.load(path, QuantumGraph.load(run_dir / QGRAPH_FILE))
    one_line_error(cli("report", run_dir, "--job", JOB), f"{path}: damaged workflow: ", reason)


def test_sound_files_load_and_round_trip(run_dir: Path) -> None:
    run = Run(run_dir)
    assert len(run.workflow) == 6 and len(run.qgraph) == 6
    header, arrays = load_arrays(run_dir / QGRAPH_FILE)
    assert header["format"] == "batchprod-qgraph" and all(a.flags.writeable for a in arrays.values())
    assert json.loads(json.dumps(header)) == header


# -- reading a run's own files only ------------------------------------------------------------------
def test_files_outside_the_run_are_never_opened(run_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    logs = run_dir / "logs"
    (logs / "evil.err").symlink_to(secret)
    (logs / "good.err").write_text("a\nb\nc\n")
    (logs / "alias.err").symlink_to("good.err")  # a symlink that stays inside is fine
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "x.err").write_text("outside\n")
    (logs / "linkdir").symlink_to(tmp_path / "outside_dir")
    os.mkfifo(logs / "fifo.err")
    assert tail_in(run_dir, logs / "good.err", 2) == ["b", "c"]
    assert tail_in(run_dir, "logs/alias.err", 1) == ["c"]
    for bad in (logs / "evil.err", secret, logs / "linkdir" / "x.err", logs / ".." / ".." / ".." / ".." / "secret.txt",
                logs / "fifo.err"):
        (line,) = tail_in(run_dir, bad, 5)
        assert line.startswith("<not shown: ") and "root:x" not in line and "outside\n" not in line
        with pytest.raises(OutsideRunError):
            open_in(run_dir, bad).close()
    assert tail_in(run_dir, logs / "nosuch.err") == [] and tail_in(run_dir, None) == []
    assert tail_in(run_dir, logs / "good.err", 0) == []
