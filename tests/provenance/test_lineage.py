"""Per-dataset provenance and lineage on a real local run of the toy pipeline (fan-in coadds)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from batchprod.provenance.lineage import Provenance
from batchprod.state.run import Run
from batchprod.testing import write_submit


def sha(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def done_run(tmp_path: Path, toy_repo: Path, cli) -> Path:
    cfg = write_submit(tmp_path, repo=toy_repo)
    assert cli("submit", cfg).exit_code == 0
    return tmp_path / "submit" / "toy" / "run"


def test_record_of_a_fan_in_output(done_run: Path, toy_repo: Path, cli) -> None:
    r = cli("provenance", done_run, "coadd:tract=0,patch=1", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)
    out = toy_repo / "toy" / "run" / "coadd" / "coadd_tract0_patch1.fits"
    assert rec["dataset"]["path"] == str(out) and rec["dataset"]["checksum"] == sha(out)
    assert rec["task"]["label"] == "coadd" and rec["job"]["name"] == "coadd_tract0_patch1"
    # the command as it ran (final paths), and the inputs it read: exactly the two overlapping calexps
    assert rec["task"]["command"].startswith("cat ") and str(out) in rec["task"]["command"]
    inputs = {(i["data_id"]["visit"], i["data_id"]["detector"]): i for i in rec["inputs"]}
    assert set(inputs) == {(1, 1), (2, 1)}
    for (v, d), i in inputs.items():
        assert i["produced_by"] == f"calibrate_visit{v}_detector{d}"
        assert i["checksum"] == sha(i["path"])
    # where and with what it ran
    assert rec["job"]["attempt"] == 1 and rec["job"]["host"] and rec["job"]["wall_s"] is not None
    assert rec["context"]["python"] and "batchprod" in rec["context"]["packages"]
    assert rec["run"]["config"]["sha256"] == hashlib.sha256((done_run / "config.yaml").read_bytes()).hexdigest()


def test_registry_inputs_are_traced_and_verify_catches_a_changed_file(done_run: Path, toy_repo: Path, cli) -> None:
    rec = json.loads(cli("provenance", done_run, "calexp:visit=2,detector=0", "--json").output)
    assert [(i["produced_by"], i["path"]) for i in rec["inputs"]] == [("registry", str(toy_repo / "raw/raw_2_0.txt"))]
    calexp = rec["dataset"]["path"]
    assert cli("provenance", done_run, calexp, "--verify").exit_code == 0
    Path(calexp).write_text("tampered\n")
    r = cli("provenance", done_run, calexp, "--verify")
    assert r.exit_code == 1 and f"changed    {calexp}" in r.output


def test_lineage_up_and_down(done_run: Path, toy_repo: Path) -> None:
    prov = Provenance(Run(done_run))
    up = prov.lineage("coadd:tract=0,patch=0", "up")
    assert [(q["label"], tuple(q["data_id"].values())) for q in up["quanta"]] == [
        ("calibrate", (1, 0)), ("calibrate", (2, 0)), ("coadd", (0, 0))]
    assert sorted(Path(r["path"]).name for r in up["registry_inputs"]) == ["raw_1_0.txt", "raw_2_0.txt"]
    assert all(o["published"] for q in up["quanta"] for o in q["outputs"])
    down = prov.lineage(str(toy_repo / "toy/run/calexp/calexp_visit1_detector1.fits"), "down")
    assert [(q["label"], q["job"]) for q in down["quanta"]] == [("coadd", "coadd_tract0_patch1")]


def test_one_context_for_a_whole_local_run_and_every_attempt_points_to_it(done_run: Path) -> None:
    db = sqlite3.connect(done_run / "state.db")
    assert db.execute("SELECT count(*) FROM context").fetchone()[0] == 1
    (h,) = db.execute("SELECT hash FROM context").fetchone()
    assert {r[0] for r in db.execute("SELECT context FROM attempt")} == {h}


def test_unknown_dataset_is_one_line_and_exit_2(done_run: Path, cli) -> None:
    r = cli("provenance", done_run, "coadd:tract=0,patch=9")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no published output" in r.output
    r = cli("provenance", done_run, "coadd:tract=,patch=1")
    assert r.exit_code == 2 and "expected TYPE:dim=value,dim=value" in r.output
    r = cli("provenance", done_run, "coadd:tract=zero")  # a string value (Rubin's instrument=Cam): not there
    assert r.exit_code == 2 and "no published output 'coadd:tract=zero'" in r.output


def test_prov_json_export_is_valid_w3c_prov(done_run: Path, cli) -> None:
    from prov.model import ProvDocument

    r = cli("provenance", done_run, "coadd:tract=0,patch=0", "--prov")
    assert r.exit_code == 0, r.output
    doc = ProvDocument.deserialize(content=r.output, format="json")
    kinds: dict[str, int] = {}
    for rec in doc.get_records():
        kinds[rec.get_type().localpart] = kinds.get(rec.get_type().localpart, 0) + 1
    # the coadd and its two calexps; one attempt; generated once, used twice; task and host agents
    assert kinds["Entity"] == 3 and kinds["Activity"] == 1 and kinds["Generation"] == 1
    assert kinds["Usage"] == 2 and kinds["Agent"] == 2 and kinds["Association"] == 2
    assert cli("provenance", done_run, "coadd:tract=0,patch=0", "--prov", "--lineage", "up").exit_code == 2


def test_final_job_outputs_are_recorded_checksummed_and_ingested(tmp_path: Path, toy_repo: Path, cli) -> None:
    final = {"command": "ls {repo}/{outputRun}/calexp > {repo}/{outputRun}/summary.txt", "outputs": ["summary.txt"]}
    cfg = write_submit(tmp_path, repo=toy_repo, finalJob=final)
    assert cli("submit", cfg).exit_code == 0
    run_dir = tmp_path / "submit" / "toy" / "run"
    summary = toy_repo / "toy" / "run" / "summary.txt"
    rec = json.loads(cli("provenance", run_dir, summary, "--json").output)
    assert rec["dataset"]["checksum"] == sha(summary) and rec["dataset"]["dataset_type"] == "summary"
    assert rec["job"]["name"] == "finalJob" and rec["task"]["command"].startswith("ls ")
    assert rec["context"] is not None and rec["inputs"] == []
    from batchprod.graph.registry import Registry

    (ds,) = Registry(toy_repo / "registry.db").find_datasets("summary")
    assert ds.location == "toy/run/summary.txt" and ds.checksum == sha(summary)
    r = cli("provenance", run_dir, summary, "--lineage", "up")
    assert r.exit_code == 2 and "final job" in r.output


def test_a_final_job_that_does_not_write_its_declared_output_fails(tmp_path: Path, toy_repo: Path, cli) -> None:
    cfg = write_submit(tmp_path, repo=toy_repo, finalJob={"command": "true", "outputs": ["summary.txt"]})
    assert cli("submit", cfg).exit_code == 1
    job = Run(tmp_path / "submit" / "toy" / "run").store.job_by_name("finalJob")
    assert job["status"] == "FAILED" and job["exit_code"] == 87
