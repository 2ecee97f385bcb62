"""The operator is resolved once when a config is loaded ($USER, else the login name, as ctrl_bps does)
and frozen with it: the output run, the submit directory and every command name that one value, and
``${USER}`` in a ctrl_bps file never depends on the job's shell."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchprod.config import Context, load_config
from batchprod.errors import ConfigError


def _rubin(tmp_path: Path, extra: dict[str, Any] | None = None) -> Any:
    data = {"pipelineYaml": "p.yaml", "payload": {"payloadName": "s1", "butlerConfig": "/repo",
                                                  "inCollection": "inputs", "dataQuery": "detector = 0"},
            "submitPath": str(tmp_path / "sub" / "{outputRun}"), **(extra or {})}
    p = tmp_path / "bps.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_config(p)


@pytest.fixture
def no_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """$USER unset (a batch or container environment); the login name is 'lg'."""
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.setattr(getpass, "getuser", lambda: "lg")


def test_without_user_the_login_name_is_the_operator_everywhere(tmp_path: Path, no_user: None) -> None:
    cfg = _rubin(tmp_path, {"extraQgraphOptions": "--comment ${USER}/$USER"})
    assert cfg.data["operator"] == "lg" and cfg.sources["operator"] == "<batchprod>"  # frozen with the config
    assert cfg.get("outputRun").startswith("u/lg/s1/")
    assert str(cfg.get("submitPath")).startswith(str(tmp_path / "sub" / "u" / "lg" / "s1"))
    cmd = cfg.render("createQuantumGraph", Context(), {"qgraphFile": "/s/g.qg", "butlerConfig": "/repo"})
    assert "-o u/lg/s1 " in cmd and f"--output-run {cfg.get('outputRun')} " in cmd
    assert cmd.endswith("--comment lg/lg") and "USER" not in cmd  # nothing left for the job's shell


def test_user_is_the_operator_and_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "alice")
    cfg = _rubin(tmp_path, {"extraQgraphOptions": "${USER}"})
    monkeypatch.setenv("USER", "mallory")  # later changes of the environment change nothing
    assert cfg.data["operator"] == "alice" and cfg.get("outputRun").startswith("u/alice/s1/")
    assert cfg.render("createQuantumGraph").endswith(" alice")


def test_an_operator_the_file_sets_is_kept(tmp_path: Path, no_user: None) -> None:
    cfg = _rubin(tmp_path, {"operator": "prod"})
    assert cfg.get("outputRun").startswith("u/prod/s1/") and cfg.sources["operator"] != "<batchprod>"


def test_no_user_and_no_login_name_is_one_line_asking_for_operator(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USER", raising=False)

    def nobody() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", nobody)
    with pytest.raises(ConfigError, match=r"bps\.yaml: key 'operator' is not set and neither \$USER nor the login "
                                          r"name says who runs this: set operator"):
        _rubin(tmp_path)
    assert _rubin(tmp_path, {"operator": "prod"}).get("outputRun").startswith("u/prod/")


def test_native_files_resolve_the_operator_once_and_keep_user_in_commands_for_the_shell(
        tmp_path: Path, no_user: None) -> None:
    (tmp_path / "pipeline.yaml").write_text("tasks: {}\n")
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"pipelineYaml": "pipeline.yaml", "payload": {"payloadName": "x"},
                                 "site": {"local": {"requestMemory": 10}},
                                 "finalJob": {"command": "echo ${USER} {operator}"}}))
    cfg = load_config(p)
    assert cfg.data["operator"] == "lg" and cfg.get("outputRun").startswith("u/lg/x/")
    assert cfg.get("command", Context(section="finalJob")) == "echo ${USER} lg"  # a native command's $ENV: the job's
