from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchprod.config import Context, load_config
from batchprod.errors import ConfigError


def write(p: Path, data: dict) -> Path:
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "pipeline.yaml").write_text("tasks: {}\n")
    return tmp_path


def test_includes_merge_and_the_including_file_wins(base: Path) -> None:
    write(base / "site.yaml", {"requestMemory": 100, "site": {"big": {"cores": 8}}, "priority": 3})
    cfg = load_config(write(base / "s.yaml", {"includeConfigs": ["site.yaml"], "pipelineYaml": "pipeline.yaml",
                                              "requestMemory": 200}))
    assert cfg.get("requestMemory") == 200
    assert cfg.get("priority") == 3
    assert cfg.data["site"]["big"]["cores"] == 8


def test_include_cycle_and_missing_include(base: Path) -> None:
    write(base / "a.yaml", {"includeConfigs": ["b.yaml"], "pipelineYaml": "pipeline.yaml"})
    write(base / "b.yaml", {"includeConfigs": ["a.yaml"]})
    with pytest.raises(ConfigError, match="includeConfigs cycle"):
        load_config(base / "a.yaml")
    write(base / "c.yaml", {"includeConfigs": ["nope.yaml"], "pipelineYaml": "pipeline.yaml"})
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'includeConfigs': file not found: .*nope\.yaml"):
        load_config(base / "c.yaml")


def test_nested_substitution_and_env(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_TEST_ROOT", "/data")
    cfg = load_config(write(base / "s.yaml", {
        "pipelineYaml": "pipeline.yaml", "project": "p1", "campaign": "{project}-c",
        "submitPath": "${BP_TEST_ROOT}/{campaign}/{outputRun}",
        "payload": {"payloadName": "x", "outputRun": "run/{campaign}"},
    }))
    assert cfg.get("submitPath") == "/data/p1-c/run/p1-c"


def test_variable_cycle_is_an_error_naming_the_key(base: Path) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml: key '(project|campaign)': variable cycle (campaign -> project -> campaign|project -> campaign -> project)"):
        load_config(write(base / "s.yaml", {"pipelineYaml": "pipeline.yaml", "project": "{campaign}",
                                            "campaign": "{project}"}))


def test_undefined_variable_and_env(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml: key 'project': undefined variable \{nothere\}"):
        load_config(write(base / "s.yaml", {"pipelineYaml": "pipeline.yaml", "project": "a{nothere}"}))
    monkeypatch.delenv("BP_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"environment variable \$\{BP_UNSET_VAR\} is not set"):
        load_config(write(base / "t.yaml", {"pipelineYaml": "pipeline.yaml", "project": "${BP_UNSET_VAR}"}))


def test_runtime_variables_are_left_for_the_executor(base: Path) -> None:
    cfg = load_config(write(base / "s.yaml", {"pipelineYaml": "pipeline.yaml", "project": "{jobName}.log"}))
    assert cfg.get("project") == "{jobName}.log"


def test_search_order(base: Path) -> None:
    cfg = load_config(write(base / "s.yaml", {
        "pipelineYaml": "pipeline.yaml",
        "computeSite": "big",
        "requestMemory": 1,
        "requestCpus": 1,
        "priority": 1,
        "numberOfRetries": 1,
        "site": {"big": {"requestMemory": 2, "requestCpus": 2, "priority": 2}},
        "cluster": {"c": {"pipetasks": "a", "requestMemory": 3, "requestCpus": 3}},
        "pipetask": {"a": {"requestMemory": 4}},
    }))
    full = cfg.job_settings(Context(label="a", cluster="c"))
    assert full["requestMemory"] == 4  # pipetask wins
    assert full["requestCpus"] == 3  # then cluster
    assert full["priority"] == 2  # then site
    assert full["numberOfRetries"] == 1  # then top level
    assert full["maxPreemptions"] == 3  # then defaults
    assert cfg.job_settings(Context(label="b"))["requestMemory"] == 2


def test_variables_resolve_in_the_lookup_context(base: Path) -> None:
    cfg = load_config(write(base / "s.yaml", {
        "pipelineYaml": "pipeline.yaml", "requestMemory": "{memoryLimit}", "memoryLimit": 100,
        "pipetask": {"a": {"memoryLimit": 300}},
    }))
    assert cfg.job_settings(Context())["requestMemory"] == 100
    assert cfg.job_settings(Context(label="a"))["requestMemory"] == 300


def test_user_variables_section(base: Path) -> None:
    cfg = load_config(write(base / "s.yaml", {
        "pipelineYaml": "pipeline.yaml", "variables": {"tier": "big"}, "project": "p-{tier}",
    }))
    assert cfg.get("project") == "p-big"
    with pytest.raises(ConfigError, match=r"key 'variables\.x': expected a value"):
        load_config(write(base / "t.yaml", {"pipelineYaml": "pipeline.yaml", "variables": {"x": [1]}}))


def test_units_and_walltime(base: Path) -> None:
    cfg = load_config(write(base / "s.yaml", {"pipelineYaml": "pipeline.yaml", "requestMemory": "4GB",
                                              "requestWalltime": "01:02:03"}))
    s = cfg.job_settings(Context())
    assert s["requestMemory"] == 4096
    assert s["requestWalltime"] == 3723


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"requestMemry": 10}, r"s\.yaml: unknown key 'requestMemry' \(did you mean 'requestMemory'\?\)"),
        ({"pipetask": {"a": {"requestCpu": 2}}}, r"unknown key 'pipetask\.a\.requestCpu' \(did you mean 'requestCpus'\?\)"),
        ({"payload": {"dataQeury": "x"}}, r"unknown key 'payload\.dataQeury' \(did you mean 'dataQuery'\?\)"),
        ({"requestCpus": "many"}, r"s\.yaml: key 'requestCpus': expected an integer, got 'many'"),
        ({"requestCpus": 0}, r"key 'requestCpus': expected a positive integer"),
        ({"requestMemory": "lots"}, r"key 'requestMemory': expected memory in MB"),
        ({"memoryMultiplier": 0.5}, r"key 'memoryMultiplier': expected a number >= 1"),
        ({"cluster": {"c": {"pipetasks": "a", "numberOfRetries": -1}}}, r"key 'cluster\.c\.numberOfRetries': expected a non-negative"),
        ({"pipetask": {"a": 5}}, r"key 'pipetask\.a': expected a mapping"),
        ({"computeSite": "nowhere"}, r"key 'computeSite': site 'nowhere' is not defined"),
        ({"finalJob": {"whenRun": "SOMETIMES"}}, r"key 'finalJob\.whenRun': expected ALWAYS or SUCCESS"),
    ],
)
def test_bad_keys_and_types(base: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(base / "s.yaml", {"pipelineYaml": "pipeline.yaml", **data}))


def test_bad_value_in_an_included_file_names_that_file(base: Path) -> None:
    write(base / "inc.yaml", {"requestCpus": "two"})
    with pytest.raises(ConfigError, match=r"inc\.yaml: key 'requestCpus'"):
        load_config(write(base / "s.yaml", {"includeConfigs": "inc.yaml", "pipelineYaml": "pipeline.yaml"}))


def test_missing_file_and_invalid_yaml(base: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(base / "nope.yaml")
    (base / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ invalid YAML"):
        load_config(base / "bad.yaml")
    with pytest.raises(ConfigError, match="required key 'pipelineYaml'"):
        load_config(write(base / "s.yaml", {"project": "x"}))


def test_resolve_path_relative_to_the_file_that_set_it(base: Path) -> None:
    sub = base / "sub"
    sub.mkdir()
    (sub / "p.yaml").write_text("tasks: {}\n")
    write(sub / "inc.yaml", {"pipelineYaml": "p.yaml"})
    cfg = load_config(write(base / "s.yaml", {"includeConfigs": ["sub/inc.yaml"]}))
    assert cfg.resolve_path("pipelineYaml") == sub / "p.yaml"
    cfg2 = load_config(write(base / "t.yaml", {"pipelineYaml": "missing.yaml"}))
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'pipelineYaml': file not found"):
        cfg2.resolve_path("pipelineYaml")


def test_a_site_defined_but_not_chosen_is_said(tmp_path: Path, toy_repo: Path, cli) -> None:
    """wmsServiceClass slurm and site.slurm.partition, without computeSite: the run uses the default
    site 'local', so the partition would be silently unused. prepare says so."""
    from batchprod.testing import TOY_PIPELINE, write_submit

    cfg = write_submit(tmp_path, TOY_PIPELINE, repo=toy_repo, site={"hpc": {"wmsServiceClass": "local", "cores": 1}})
    r = cli("prepare", cfg)
    assert r.exit_code == 0, r.output
    assert "note:     site 'hpc' is defined in the file but computeSite is 'local' (the default): its settings are " \
           "not used (set computeSite to use it)" in r.output
    cfg2 = write_submit(tmp_path / "b", TOY_PIPELINE, repo=toy_repo, computeSite="hpc",
                        site={"hpc": {"wmsServiceClass": "local", "cores": 1}}, payload={"outputRun": "toy/b"})
    assert "is defined in the file" not in cli("prepare", cfg2).output
