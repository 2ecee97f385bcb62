"""The CLI: bad input gives one line, exit 2 and nothing written; report/runs/prepare work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from batchprod.testing import write_submit


def test_submit_report_runs(tmp_path: Path, toy_repo: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_submit(tmp_path, repo=toy_repo)
    r = cli("submit", cfg)
    assert r.exit_code == 0, r.output
    assert "SUCCEEDED" in r.output
    rep = cli("report", tmp_path / "submit" / "toy" / "run", "--json")
    data = json.loads(rep.output)
    assert rep.exit_code == 0
    assert data["jobs"]["total"] == data["jobs"]["succeeded"] == 6
    assert data["labels"]["coadd"]["succeeded"] == 2
    # by name under the submit root, and the latest run when none is given
    monkeypatch.chdir(tmp_path)
    assert json.loads(cli("report", "toy/run", "--json").output)["run"] == "toy/run"
    assert json.loads(cli("report", "--json").output)["run"] == "toy/run"
    runs = json.loads(cli("runs", "--json").output)
    assert [x["run"] for x in runs] == ["toy/run"]


def test_resubmitting_the_same_run_is_refused(tmp_path: Path, toy_repo: Path, cli) -> None:
    cfg = write_submit(tmp_path, repo=toy_repo)
    assert cli("submit", cfg).exit_code == 0
    r = cli("submit", cfg)
    assert r.exit_code == 2
    assert "submit directory already exists" in r.output


def test_prepare_runs_nothing(tmp_path: Path, toy_repo: Path, cli) -> None:
    cfg = write_submit(tmp_path, repo=toy_repo)
    r = cli("prepare", cfg)
    assert r.exit_code == 0, r.output
    assert "6 quanta (calibrate=4, coadd=2)" in r.output
    assert not (toy_repo / "toy").exists()  # no output written
    data = json.loads(cli("report", tmp_path / "submit" / "toy" / "run", "--json").output)
    assert data["status"] == "PREPARED" and data["jobs"]["pending"] == 6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(requestMemry=5), "unknown key 'requestMemry' (did you mean 'requestMemory'?)"),
        (lambda c: c.update(requestCpus="x"), "key 'requestCpus': expected an integer"),
        (lambda c: c.update(pipelineYaml="nope.yaml"), "key 'pipelineYaml': file not found"),
        (lambda c: c["payload"].update(repo="/nonexistent/repo"), "key 'payload.repo': file not found"),
        (lambda c: c["payload"].update(dataQuery="visit = = 1"), "query: expected a number"),
        (lambda c: c["payload"].update(dataQuery="visti = 1"), "unknown dimension 'visti'"),
        (lambda c: c.update(project="{undefinedThing}"), "undefined variable {undefinedThing}"),
        (lambda c: c.update(finalJob={"command": "true", "outputs": ["../x"]}),
         "key 'finalJob.outputs': '../x' must be a file path inside the output run"),
        (lambda c: c.update(cluster={"c": {"pipetasks": "calibrate,nosuch"}}), "unknown task label 'nosuch'"),
        (lambda c: c.update(pipelineYaml="bad_template.yaml"), "key 'tasks.calibrate.command': cannot fill the template"),
        (lambda c: c.update(wmsServiceClass="slurmm"), "key 'wmsServiceClass': wmsServiceClass 'slurmm': unknown WMS"),
        (lambda c: c.update(computeSite="big", site={"big": {"wmsServiceClass": "nope"}}),
         "key 'site.big.wmsServiceClass': wmsServiceClass 'nope': unknown WMS"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, toy_repo: Path, cli, mutate, message) -> None:
    cfg_path = write_submit(tmp_path, repo=toy_repo)
    (tmp_path / "bad_template.yaml").write_text(yaml.safe_dump({"tasks": {"calibrate": {
        "command": "test {detector} || { exit 3; }", "dimensions": ["visit", "detector"], "inputs": ["raw"],
        "outputs": ["calexp"]}}}))
    cfg = yaml.safe_load(cfg_path.read_text())
    mutate(cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = cli("submit", cfg_path)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert message in lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "submit").exists() or not any((tmp_path / "submit").iterdir())
    assert not (toy_repo / "toy").exists()


def test_unknown_run(cli, tmp_path: Path) -> None:
    r = cli("report", tmp_path / "nothing-here")
    assert r.exit_code == 2 and "not found" in r.output


def test_files_batchprod_writes_are_private(tmp_path, toy_repo, cli, monkeypatch) -> None:
    import os
    import stat

    from batchprod.testing import write_submit

    old = os.umask(0o022)
    try:
        monkeypatch.delenv("BATCHPROD_UMASK", raising=False)
        assert cli("submit", write_submit(tmp_path, repo=toy_repo)).exit_code == 0
        submit = tmp_path / "submit"
        for p in [*submit.rglob("*"), *(toy_repo / "toy").rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            assert mode & 0o077 == 0, f"{p}: {oct(mode)}"
        monkeypatch.setenv("BATCHPROD_UMASK", "8")
        r = cli("runs", "--root", submit)
        assert r.exit_code == 2 and "BATCHPROD_UMASK" in r.output
    finally:
        os.umask(old)


def test_runs_flags_damaged_runs_and_a_damaged_config_is_one_line(tmp_path, toy_repo, cli) -> None:
    import json

    from batchprod.testing import write_submit

    assert cli("submit", write_submit(tmp_path, repo=toy_repo)).exit_code == 0
    root = tmp_path / "submit"
    bad = root / "broken" / "run"
    bad.mkdir(parents=True)
    (bad / "state.db").write_bytes(b"this is not a database" * 100)
    dangling = root / "gone" / "run"
    dangling.mkdir(parents=True)
    (dangling / "state.db").symlink_to(tmp_path / "nowhere.db")
    r = cli("runs", "--root", root, "--json")
    assert r.exit_code == 0, r.output
    rows = {x["run"]: x for x in json.loads(r.output)}
    assert rows["toy/run"]["status"] == "SUCCEEDED"
    damaged = [x for x in rows.values() if x["status"] == "DAMAGED"]
    assert len(damaged) == 2 and all("\n" not in x["message"] for x in damaged)
    good = root / "toy" / "run"
    (good / "config.yaml").write_text("{[ not yaml")
    r = cli("report", good, "--trace", tmp_path / "t.tsv")  # the trace names the run's compute site
    assert r.exit_code == 2 and "damaged run config" in r.output and "Traceback" not in r.output
