"""Post-run ingest: a run's outputs become registry inputs of later runs, chosen by inCollection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batchprod.engine.ingest import ingest_outputs
from batchprod.graph.registry import Registry
from batchprod.state.run import Run
from batchprod.testing import command_task, write_submit

CALIBRATE = {"tasks": {"calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"])}}
COADD = {"tasks": {"coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"])}}


def submit(cli, tmp_path: Path, name: str, pipeline: dict, repo: Path, **keys) -> Path:
    cfg = write_submit(tmp_path / name, pipeline, repo=repo, payload={"outputRun": f"{name}/run"}, **keys)
    r = cli("submit", cfg)
    assert r.exit_code == 0, r.output
    return tmp_path / name / "submit" / name / "run"


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_are_ingested_and_feed_a_later_run(tmp_path: Path, toy_repo: Path, cli) -> None:
    a = submit(cli, tmp_path, "a", CALIBRATE, toy_repo)
    reg = Registry(toy_repo / "registry.db")
    calexps = reg.find_datasets("calexp")
    assert ("a/run", "a/run/calexp/calexp_visit1_detector0.fits") in [(r.run, r.location) for r in calexps]
    assert len(calexps) == 4 and all(r.checksum == sha(toy_repo / r.location) for r in calexps)
    assert Run(a).store.run_info()["message"] == "4 outputs in the registry"
    assert "4 outputs in the registry" in cli("report", a).output  # operators see the ingest outcome
    ingest_outputs(Run(a))  # again, as after a crash: nothing doubles
    assert len(reg.find_datasets("calexp")) == 4

    b = submit(cli, tmp_path, "b", COADD, toy_repo)
    rec = json.loads(cli("provenance", b, "coadd:tract=0,patch=1", "--json").output)
    assert {(i["produced_by"], Path(i["path"]).name) for i in rec["inputs"]} == {
        ("registry", "calexp_visit1_detector1.fits"), ("registry", "calexp_visit2_detector1.fits")}
    assert all(i["checksum"] == sha(Path(i["path"])) for i in rec["inputs"])
    assert len(reg.find_datasets("coadd")) == 2


def test_one_data_id_in_two_runs_needs_an_input_chain(tmp_path: Path, toy_repo: Path, cli) -> None:
    submit(cli, tmp_path, "a", CALIBRATE, toy_repo)
    submit(cli, tmp_path, "c", CALIBRATE, toy_repo)
    cfg = write_submit(tmp_path / "d", COADD, repo=toy_repo, payload={"outputRun": "d/run"})
    r = cli("prepare", cfg)
    assert r.exit_code == 2 and "is in runs 'a/run' and 'c/run'" in r.output and "inCollection" in r.output
    assert not (tmp_path / "d" / "submit").exists()
    cfg = write_submit(tmp_path / "d", COADD, repo=toy_repo, payload={"outputRun": "d/run", "inCollection": "c/run,b/run"})
    r = cli("prepare", cfg)  # a misspelt run is named, not silently skipped
    assert r.exit_code == 2 and "key 'payload.inCollection': run 'b/run' is not in the registry" in r.output
    cfg = write_submit(tmp_path / "d", COADD, repo=toy_repo, payload={"outputRun": "d/run", "inCollection": "c/run,a/run"})
    assert cli("prepare", cfg).exit_code == 0
    qg = Run(tmp_path / "d" / "submit" / "d" / "run").qgraph
    assert {loc.split("/")[0] for _, _, loc, _ in qg.ext_datasets} == {"c"}  # the first run of the chain wins


def test_an_output_type_registered_with_other_dimensions_is_refused(tmp_path: Path, toy_repo: Path, cli) -> None:
    submit(cli, tmp_path, "a", CALIBRATE, toy_repo)
    per_visit = {"tasks": {"calibrate": command_task(["visit"], ["raw"], ["calexp"])}}
    r = cli("prepare", write_submit(tmp_path / "e", per_visit, repo=toy_repo, payload={"outputRun": "e/run"}))
    assert r.exit_code == 2
    assert "output 'calexp' is registered with dimensions (visit, detector), the task's are (visit)" in r.output


def test_a_failed_ingest_loses_nothing_and_restart_repeats_it(tmp_path: Path, toy_repo: Path, cli) -> None:
    from batchprod.engine.control import execute
    from batchprod.engine.prepare import prepare
    from batchprod.wms.registry import get_wms

    run = prepare(write_submit(tmp_path / "f", CALIBRATE, repo=toy_repo, payload={"outputRun": "f/run"}))
    registry = toy_repo / "registry.db"
    registry.rename(tmp_path / "away.db")  # the registry is unreachable when the run ends
    assert execute(get_wms(run.wms_name()), run) == "SUCCEEDED"
    message = run.store.run_info()["message"]
    assert message.startswith("outputs not ingested into the registry:")
    assert json.loads(cli("report", run.submit_dir, "--json").output)["message"] == message
    assert "outputs not ingested into the registry" in cli("report", run.submit_dir).output
    (tmp_path / "away.db").rename(registry)
    assert cli("restart", run.submit_dir).exit_code == 0
    assert len(Registry(registry).find_datasets("calexp", ["f/run"])) == 4
    assert run.store.run_info()["message"] == "4 outputs in the registry"


def test_a_run_whose_ingest_failed_exits_1_with_one_line_and_the_next_step(tmp_path: Path, toy_repo: Path,
                                                                          cli) -> None:
    """Every job succeeded but the registry was not told: a script must not read that as done."""
    from batchprod.engine.prepare import prepare

    run = prepare(write_submit(tmp_path / "g", CALIBRATE, repo=toy_repo, payload={"outputRun": "g/run"}))
    registry = toy_repo / "registry.db"
    registry.rename(tmp_path / "away.db")
    r = cli("restart", run.submit_dir)
    (tmp_path / "away.db").rename(registry)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if "outputs not ingested" in ln]
    assert len(lines) == 1 and "restart ingests again" in lines[0] and "sqlalche.me" not in r.output
    assert "next: batchprod restart" in r.output
    assert cli("restart", run.submit_dir).exit_code == 0
