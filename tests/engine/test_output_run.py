"""Output runs stay inside the repository and a finished one is never overwritten by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchprod.graph import Registry
from batchprod.testing import TOY_PIPELINE, write_submit


def _submit(tmp_path: Path, toy_repo: Path, sub: str = "a", **keys) -> Path:
    return write_submit(tmp_path / sub, repo=toy_repo, **keys)


def _one_error_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("name", ["/x", ".", "..", "a/../../b", "registry.db", None, "", "a//b", "x" * 300,
                                  "a\nb", "_staging"])
def test_bad_output_run_names_are_refused(tmp_path: Path, toy_repo: Path, cli, name) -> None:
    cfg = _submit(tmp_path, toy_repo, payload={"outputRun": name})
    line = _one_error_line(cli("prepare", cfg))
    assert "payload.outputRun" in line and str(cfg) in line
    assert not (tmp_path / "a" / "submit").exists()


def test_finished_output_run_is_refused_then_extended_or_replaced(tmp_path: Path, toy_repo: Path, cli) -> None:
    first = _submit(tmp_path, toy_repo, "a")
    assert cli("submit", first).exit_code == 0
    reg = Registry(toy_repo / "registry.db")
    n_first = len(reg.run_datasets("toy/run"))
    reg.close()
    assert n_first > 0

    again = _submit(tmp_path, toy_repo, "b")
    line = _one_error_line(cli("submit", again))
    assert "output run 'toy/run' already holds" in line and "--extend-run" in line and "--replace-run" in line
    assert not (tmp_path / "b" / "submit").exists()

    # extend: nothing new to do, every job is marked done without running, nothing rewritten
    coadd = next((toy_repo / "toy" / "run" / "coadd").iterdir())
    mtime = coadd.stat().st_mtime_ns
    r = cli("submit", again, "--extend-run")
    assert r.exit_code == 0, r.output
    from batchprod.state.run import find_run

    run = find_run(tmp_path / "b" / "submit" / "toy" / "run")
    jobs = run.store.jobs()
    assert all(j["status"] == "SUCCEEDED" and j["attempts"] == 0 for j in jobs)
    assert "--extend-run" in jobs[0]["message"]
    assert coadd.stat().st_mtime_ns == mtime

    # replace: old rows and files go first (recorded), then the run writes them anew
    stray = toy_repo / "toy" / "run" / "stray.txt"
    stray.write_text("left by the old run")
    third = _submit(tmp_path, toy_repo, "c")
    r = cli("submit", third, "--replace-run")
    assert r.exit_code == 0, r.output
    assert not stray.exists()
    history = (tmp_path / "c" / "submit" / "toy" / "run" / "history.log").read_text()
    assert f"removed {n_first:,} datasets of 'toy/run'" in history
    reg = Registry(toy_repo / "registry.db")
    assert len(reg.run_datasets("toy/run")) == n_first
    reg.close()


def test_extend_runs_only_new_data_ids(tmp_path: Path, toy_repo: Path, cli) -> None:
    first = _submit(tmp_path, toy_repo, "a", payload={"dataQuery": "visit = 1"})
    assert cli("submit", first).exit_code == 0
    wider = _submit(tmp_path, toy_repo, "b", payload={"dataQuery": "visit IN (1, 2)"},
                    pipelineYaml="pipeline.yaml")
    (tmp_path / "b" / "pipeline.yaml").write_text(yaml.safe_dump({"tasks": {"calibrate": TOY_PIPELINE["tasks"]["calibrate"]}}))
    assert cli("submit", wider, "--extend-run").exit_code == 0
    from batchprod.state.run import find_run

    jobs = find_run(tmp_path / "b" / "submit" / "toy" / "run").store.jobs()
    ran = {j["name"] for j in jobs if j["attempts"] == 1}
    skipped = {j["name"] for j in jobs if j["attempts"] == 0}
    assert ran and skipped
    assert all("visit2" in n for n in ran) and all("visit1" in n for n in skipped)


def test_output_run_that_is_an_input_run_is_refused(tmp_path: Path, toy_repo: Path, cli) -> None:
    cfg = _submit(tmp_path, toy_repo, payload={"outputRun": "raw", "inCollection": "raw"})
    line = _one_error_line(cli("prepare", cfg))
    assert "is also an input run" in line


@pytest.mark.parametrize("flag", [[], ["--extend-run"], ["--replace-run"]])
def test_an_input_run_is_never_an_output_run_even_without_in_collection(tmp_path: Path, toy_repo: Path, cli,
                                                                       flag: list[str]) -> None:
    """'raw' holds what the pipeline reads: extending would write into it, replacing would delete it."""
    cfg = _submit(tmp_path, toy_repo, payload={"outputRun": "raw"})
    line = _one_error_line(cli("prepare", cfg, *flag))
    assert "holds raw datasets, which this pipeline reads" in line
    assert len(list((toy_repo / "raw").iterdir())) == 4  # nothing removed
    reg = Registry(toy_repo / "registry.db")
    assert len(reg.run_datasets("raw")) == 4
    reg.close()


def test_a_run_that_would_share_its_output_area_with_another_is_refused(tmp_path: Path, toy_repo: Path,
                                                                        cli) -> None:
    """'toy' is the parent of 'toy/run': replacing it would remove the other run's files."""
    assert cli("submit", _submit(tmp_path, toy_repo, "a")).exit_code == 0
    files = sorted((toy_repo / "toy" / "run").rglob("*"))
    for flag in ([], ["--replace-run"]):
        line = _one_error_line(cli("prepare", _submit(tmp_path, toy_repo, "b", payload={"outputRun": "toy"}), *flag))
        assert "would share files with run 'toy/run' (inside its output area)" in line
    line = _one_error_line(cli("prepare", _submit(tmp_path, toy_repo, "c", payload={"outputRun": "toy/run/x"})))
    assert "would share files with run 'toy/run' (whose output area holds it)" in line
    assert sorted((toy_repo / "toy" / "run").rglob("*")) == files


def test_an_output_area_under_a_file_is_refused(tmp_path: Path, toy_repo: Path, cli) -> None:
    line = _one_error_line(cli("prepare", _submit(tmp_path, toy_repo, payload={"outputRun": "registry.db/x"})))
    assert "which is a file" in line and not (tmp_path / "a" / "submit").exists()


@pytest.mark.parametrize("outputs,message", [
    ([""], "must be a file path"),
    (["dir/"], "must be a file path"),
    (["a/./b.txt"], "must be a file path"),
    (["cat.txt", "sub/cat.fits"], "have one stem 'cat'"),
    (["calexp.fits"], "which the pipeline already has"),
    (["a\nb.fits"], "the stem names a dataset type"),
    (["x y;rm.fits"], "the stem names a dataset type"),
    (["dir$(id)/x.fits"], "the path may hold only"),
])
def test_bad_final_job_outputs(tmp_path: Path, toy_repo: Path, cli, outputs, message) -> None:
    cfg = _submit(tmp_path, toy_repo, finalJob={"command": "true", "outputs": outputs})
    line = _one_error_line(cli("prepare", cfg))
    assert "finalJob.outputs" in line and message in line
