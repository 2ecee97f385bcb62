"""Bad input never hurts a run (issue 8): each malformed submit config a user's fuzz set found is one
ConfigError line naming the file and the key, fast, with nothing written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from batchprod.config import Context, load_config
from batchprod.errors import ConfigError

PIPE = "pipelineYaml: pipeline.yaml\n"


@pytest.fixture
def d(tmp_path: Path) -> Path:
    (tmp_path / "pipeline.yaml").write_text("tasks: {a: {command: 'true', outputs: [x]}}\n")
    return tmp_path


def fails(path: Path, pattern: str, overrides: dict | None = None, seconds: float = 2.0) -> str:
    """load_config raises a one-line ConfigError matching pattern, within ``seconds``; nothing written."""
    before = sorted(p.name for p in path.parent.iterdir())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path, overrides)
    assert time.monotonic() - t0 < seconds
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    assert sorted(p.name for p in path.parent.iterdir()) == before
    return msg


def cfg(d: Path, text: str, name: str = "s.yaml") -> Path:
    p = d / name
    p.write_text(PIPE + text)
    return p


# -- numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("requestCpus: 99999999999999999999999", r"s\.yaml: key 'requestCpus': integer .* out of range"),
        ("requestCpus: 100000", r"key 'requestCpus': expected a positive integer <= 4096"),
        ("requestMemory: 999999999999", r"key 'requestMemory': expected memory in MB .*<= 67108864"),
        ("requestMemory: '99999999999999999999GB'", r"key 'requestMemory': expected memory <= 67108864 MB"),
        (f"requestMemory: '{'9' * 400}GB'", r"key 'requestMemory': expected memory in MB or with a unit"),
        ("numberOfRetries: 1000000", r"key 'numberOfRetries': expected a non-negative integer <= 1000"),
        ("maxInfraRetries: 1000000", r"key 'maxInfraRetries': expected a non-negative integer <= 1000"),
        ("requestWalltime: 10000000000", r"key 'requestWalltime': expected a non-negative number of seconds <="),
        ("requestWalltime: '99999:00:00'", r"key 'requestWalltime': expected a walltime of at most"),
        ("priority: 99999999999", r"key 'priority': expected an integer <="),
        (f"requestCpus: {'9' * 5000}", r"s\.yaml: line 2 invalid YAML: integer with more than 30 digits"),
        ("pipetask: {a: {requestCpus: 10000}}", r"key 'pipetask\.a\.requestCpus': expected a positive integer <= 4096"),
        ("requestMemory: 0", r"key 'requestMemory': expected more than 0 MB, got 0"),
        ("requestMemory: '0.1KB'", r"key 'requestMemory': expected more than 0 MB"),
        ("site: {local: {requestMemory: 0}}", r"key 'site\.local\.requestMemory': expected more than 0 MB"),
    ],
)
def test_numbers_are_bounded(d: Path, text: str, pattern: str) -> None:
    fails(cfg(d, text + "\n"), pattern)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("memoryMultiplier: .nan", "memoryMultiplier"),
        ("memoryMultiplier: .inf", "memoryMultiplier"),
        ("memoryMultiplier: 'nan'", "memoryMultiplier"),
        ("memoryMultiplier: 1e999", "memoryMultiplier"),
        ("infraRetryDelay: .inf", "infraRetryDelay"),
        ("pollInterval: .nan", "pollInterval"),
        ("site: {local: {pollInterval: -.inf}}", r"site\.local\.pollInterval"),
        ("variables: {x: .nan}", r"variables\.x"),
    ],
)
def test_non_finite_floats_are_refused_everywhere(d: Path, text: str, key: str) -> None:
    fails(cfg(d, text + "\n"), rf"s\.yaml: key '{key}': expected a finite number")


def test_memory_limit_zero_still_means_the_sites_memory(d: Path) -> None:
    c = load_config(cfg(d, "memoryLimit: 0\nrequestMemory: 1\n"))
    assert c.job_settings(Context())["memoryLimit"] == 0


# -- wrong types -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("payload: 3", r"s\.yaml: key 'payload': expected a mapping, got 3"),
        ("site: [1]", r"s\.yaml: key 'site': expected a mapping, got a list"),
        ("pipetask: x", r"s\.yaml: key 'pipetask': expected a mapping, got 'x'"),
        ("cluster: {x: 5}", r"s\.yaml: key 'cluster\.x': expected a mapping, got 5"),
        ("variables: [1]", r"key 'variables': expected a mapping"),
        ("finalJob: 3", r"key 'finalJob': expected a mapping"),
        ("computeSite: [a]", r"key 'computeSite': expected a string, got a list"),
        ("pollInterval: [1]", r"key 'pollInterval': expected a number"),
        ("project: !!binary aGVsbG8=", r"key 'project': unsupported value of type bytes"),
        ("project: !!set {a, b}", r"key 'project': unsupported value of type set"),
        ("includeConfigs: [[x]]", r"key 'includeConfigs': expected a list of files"),
    ],
)
def test_a_section_or_value_of_the_wrong_type(d: Path, text: str, pattern: str) -> None:
    fails(cfg(d, text + "\n"), pattern)


# -- the file itself -------------------------------------------------------------------------------
def test_non_utf8_file(d: Path) -> None:
    p = d / "s.yaml"
    p.write_bytes(PIPE.encode() + b"project: caf\xe9\n")
    fails(p, r"s\.yaml: line 2: not UTF-8 text \(byte 0xe9\)")


@pytest.mark.parametrize("text", ["project: " + "[" * 10000 + "]" * 10000, "variables: " + "{a: " * 10000 + "1" + "}" * 10000,
                                  "project:\n" + "".join(" " * (i + 1) + "- \n" for i in range(1000))])
def test_ten_thousand_deep_nesting(d: Path, text: str) -> None:
    fails(cfg(d, text + "\n"), r"s\.yaml: line \d+ invalid YAML: (exceeded maximum nesting depth|nesting deeper than 64)")


def billion_laughs(top: str = "lol") -> str:
    text = f'{top}0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 10):
        text += f"{top}{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_alias_bomb_is_refused_before_it_expands(d: Path) -> None:
    bomb = billion_laughs().replace("\n", "\n  ").rstrip()
    fails(cfg(d, f"variables:\n  {bomb}\n"), r"s\.yaml: line \d+ invalid YAML: document larger than 200000 nodes")
    fails(cfg(d, "variables: &v {x: *v}\n", "r.yaml"), r"r\.yaml: line 2 invalid YAML: recursive alias \*v")


def test_small_aliases_and_merge_keys_still_work(d: Path) -> None:
    c = load_config(cfg(d, "site:\n  base: &b {cores: 4, memory: 8GB}\n  big: {<<: *b, cores: 8}\n"
                           "computeSite: big\n"))
    assert c.data["site"]["big"] == {"cores": 8, "memory": "8GB"}


def test_duplicate_keys_name_the_line(d: Path) -> None:
    fails(cfg(d, "requestCpus: 1\nproject: x\nrequestCpus: 2\n"),
          r"s\.yaml: line 4 invalid YAML: duplicate key 'requestCpus' \(first at line 2\)")
    fails(cfg(d, "site:\n  local: {cores: 1, cores: 2}\n", "t.yaml"), r"t\.yaml: line 3 invalid YAML: duplicate key 'cores'")


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b'project: "a\\0b"\n', r"s\.yaml: line 2 invalid YAML: NUL character in a string"),
        (b"project: a\0b\n", r"s\.yaml: invalid YAML: byte \d+: control characters are not allowed"),
        (b'finalJob: {command: "rm -rf /tmp/x\\0; echo"}\n', r"line 2 invalid YAML: NUL character"),
        (b'"proj\\0ect": 1\n', r"line 2 invalid YAML: NUL character"),
    ],
)
def test_nul_bytes(d: Path, raw: bytes, pattern: str) -> None:
    p = d / "s.yaml"
    p.write_bytes(PIPE.encode() + raw)
    fails(p, pattern)


def test_odd_scalars_do_not_escape_as_python_errors(d: Path) -> None:
    fails(cfg(d, "project: 2024-13-45\n"), r"s\.yaml: invalid YAML: month must be in 1\.\.12")
    fails(cfg(d, "project: !!python/object:os.system x\n", "t.yaml"), r"t\.yaml: line 2 invalid YAML: could not determine")


def test_unusable_file_names(d: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(d / ("x" * 5000))
    with pytest.raises(ConfigError, match="not a usable file name"):
        load_config(str(d / "a\0b"))
    fails(cfg(d, f"includeConfigs: [{'y' * 5000}]\n"), r"s\.yaml: key 'includeConfigs': file not found")
    c = load_config(cfg(d, "", "t.yaml"), {"pipelineYaml": "z" * 5000})
    with pytest.raises(ConfigError, match=r"key 'pipelineYaml': file not found"):
        c.resolve_path("pipelineYaml")


# -- variables -------------------------------------------------------------------------------------
def test_a_3000_long_variable_chain_is_a_clear_error(d: Path) -> None:
    chain = "".join(f"  v{i}: '{{v{i + 1}}}'\n" for i in range(3000)) + "  v3000: end\n"
    fails(cfg(d, "project: '{v0}'\nvariables:\n" + chain), r"variables nested more than 32 deep: project -> v0 -> v1 -> \.\.\.")


def test_a_doubling_substitution_bomb_is_a_clear_error(d: Path) -> None:
    names = [f"v{i}" for i in range(30)]
    text = "".join(f"  {a}: '{{{b}}}{{{b}}}'\n" for a, b in zip(names, names[1:], strict=False)) + "  v29: xxxxxxxx\n"
    fails(cfg(d, "project: '{v0}'\nvariables:\n" + text), r"longer than 100000 characters once its variables are filled")


def test_a_short_chain_still_resolves(d: Path) -> None:
    chain = "".join(f"  v{i}: '{{v{i + 1}}}'\n" for i in range(20)) + "  v20: end\n"
    assert load_config(cfg(d, "project: '{v0}-{v0}'\nvariables:\n" + chain)).get("project") == "end-end"


# -- WMS and Python references (the class itself is checked at prepare: tests/wms/test_registry.py)
def test_a_real_wms_class_loads(d: Path) -> None:
    load_config(cfg(d, "wmsServiceClass: batchprod.wms.local:LocalService\n"))
    load_config(cfg(d, "wmsServiceClass: slurm\n", "t.yaml"))  # entry-point names are get_wms's to check


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("nosuch_mod_x:main", r"s\.yaml: key 'finalJob\.python': module 'nosuch_mod_x' not found"),
        ("batchprod.demo.tasks:nosuch", r"key 'finalJob\.python': module 'batchprod\.demo\.tasks' has no 'nosuch'"),
        ("batchprod.demo.tasks:PATCH_SIZE", r"key 'finalJob\.python': 'batchprod\.demo\.tasks:PATCH_SIZE' is not a function"),
        ("nocolon", r"key 'finalJob\.python': expected 'module:function'"),
    ],
)
def test_final_job_python_must_import(d: Path, value: str, pattern: str) -> None:
    fails(cfg(d, f"finalJob: {{python: '{value}'}}\n"), pattern)


def test_final_job_python_that_imports_loads(d: Path) -> None:
    load_config(cfg(d, "finalJob: {python: 'batchprod.demo.tasks:merge_catalogs'}\n"))


# -- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("pipetask: {'../../../x': {requestCpus: 1}}", r"key 'pipetask\.\.\./\.\./\.\./x': task label '\.\./\.\./\.\./x' must start"),
        (f"cluster: {{{'c' * 300}: {{pipetasks: a}}}}", r"key 'cluster\.c+\.\.\.': cluster name 'c+\.\.\. must start"),
        ("cluster: {\"a\\nb\": {pipetasks: a}}", r"key 'cluster\.a\\nb': cluster name 'a\\nb' must start"),
        ("cluster: {finalJob: {pipetasks: a}}", r"key 'cluster\.finalJob': cluster name 'finalJob' is reserved"),
    ],
)
def test_labels_and_cluster_names_are_safe(d: Path, text: str, pattern: str) -> None:
    fails(cfg(d, text + "\n"), pattern)


def test_hyphens_and_underscores_are_fine(d: Path) -> None:
    load_config(cfg(d, "pipetask: {make-coadd_2: {requestCpus: 2}}\ncluster: {per-visit: {pipetasks: make-coadd_2}}\n"))


# -- overrides -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"payload": 3}, r"^<command line> -o payload: key 'payload': expected a mapping, got 3$"),
        ({"project.b.c": 1}, r"^<command line> -o project\.b\.c: 'project' is a value \('x'\), not a section"),
        ({"": 1}, r"^<command line> -o '': empty key"),
        ({"proj\0ect": 1}, r"^<command line> -o 'proj\\x00ect': key part 'proj\\x00ect' may only hold"),
        ({"payload..x": 1}, r"^<command line> -o 'payload\.\.x': key part '' may only hold"),
        ({"project": "a\0b"}, r"^<command line> -o project: key 'project': NUL character in a string$"),
        ({"requestCpus": 10**30}, r"^<command line> -o requestCpus: key 'requestCpus': integer .* out of range"),
        ({"memoryMultiplier": float("nan")}, r"^<command line> -o memoryMultiplier: key 'memoryMultiplier': expected a finite"),
        ({"requestMemry": 1}, r"^<command line> -o requestMemry: unknown key 'requestMemry' \(did you mean 'requestMemory'\?\)"),
        ({"site.local.cores": "many"}, r"^<command line> -o site\.local\.cores: key 'site\.local\.cores': expected an integer"),
        ({"includeConfigs": ["x.yaml"]}, r"^<command line> -o includeConfigs: includeConfigs cannot be set"),
    ],
)
def test_bad_overrides_name_the_command_line(d: Path, overrides: dict, pattern: str) -> None:
    fails(cfg(d, "project: x\n"), pattern, overrides)


def test_a_deep_or_self_referencing_override_value(d: Path) -> None:
    deep: list = []
    cur = deep
    for _ in range(5000):
        cur.append([])
        cur = cur[0]
    fails(cfg(d, ""), r"^<command line> -o project: key 'project': nested too deep", {"project": deep})
    loop: list = []
    loop.append(loop)
    fails(cfg(d, "", "t.yaml"), r"^<command line> -o project: key 'project': nested too deep", {"project": loop})


def test_parse_overrides_reads_values_with_the_same_bounds_as_a_file() -> None:
    from batchprod.config import parse_overrides

    assert parse_overrides(["site.local.cores=4", "project=a=b", "x="]) == {"site.local.cores": 4, "project": "a=b", "x": None}
    for pair, pattern in [
        ("project=" + "[" * 10000, r"^<command line> -o project: line 1 invalid YAML: exceeded maximum nesting depth$"),
        ("project=" + "{a: " * 100, r"^<command line> -o project: line 1 invalid YAML: nesting deeper than 64 levels$"),
        ('project="a\\0b"', r"^<command line> -o project: line 1 invalid YAML: NUL"),
        ("requestCpus=" + "9" * 5000, r"^<command line> -o requestCpus: line 1 invalid YAML: integer with more than 30"),
        ("noequals", r"^<command line> -o 'noequals': expected KEY=VALUE$"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            parse_overrides([pair])


def test_good_overrides_still_apply(d: Path) -> None:
    c = load_config(cfg(d, "site: {local: {cores: 2}}\n"), {"site.local.cores": 4, "pipetask": {"a": {"requestCpus": 2}}})
    assert c.data["site"]["local"]["cores"] == 4
    assert c.job_settings(Context(label="a"))["requestCpus"] == 2
    assert c.where("pipetask.a.requestCpus") == "<command line> -o pipetask"


# -- includes --------------------------------------------------------------------------------------
def test_nested_includes_resolve_against_the_file_that_names_them(tmp_path: Path) -> None:
    sub, deeper = tmp_path / "sub", tmp_path / "sub" / "deeper"
    deeper.mkdir(parents=True)
    (tmp_path / "A.yaml").write_text("includeConfigs: [sub/B.yaml]\n")
    (sub / "B.yaml").write_text("includeConfigs: [C.yaml, deeper/D.yaml]\nproject: b\n")
    (sub / "C.yaml").write_text("requestCpus: 3\n")  # sub/C.yaml, not ./C.yaml
    (tmp_path / "C.yaml").write_text("requestCpus: 99\n")
    (deeper / "D.yaml").write_text("pipelineYaml: p.yaml\n")
    (deeper / "p.yaml").write_text("tasks: {}\n")
    c = load_config(tmp_path / "A.yaml")
    assert c.get("requestCpus") == 3
    assert c.where("requestCpus") == str(sub / "C.yaml")
    assert c.resolve_path("pipelineYaml") == deeper / "p.yaml"  # against D.yaml, the file that set it
    (deeper / "D.yaml").write_text("pipelineYaml: p.yaml\nrequestMemory: lots\n")
    fails(tmp_path / "A.yaml", r"sub/deeper/D\.yaml: key 'requestMemory': expected memory")
    (deeper / "D.yaml").write_text("pipelineYaml: p.yaml\nrequestCpus: 1\nrequestCpus: 2\n")
    fails(tmp_path / "A.yaml", r"sub/deeper/D\.yaml: line 3 invalid YAML: duplicate key")


# -- ${ENV} in commands ----------------------------------------------------------------------------
def test_env_in_the_final_command_stays_for_the_jobs_shell(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchprod.workflow.clustering import final_job_from_config

    monkeypatch.setenv("BP_SECRET_TOKEN", "hunter2")
    monkeypatch.delenv("BP_UNSET_IN_PREPARE", raising=False)
    c = load_config(cfg(d, "project: p-${BP_SECRET_TOKEN}\nvariables: {tok: '${BP_SECRET_TOKEN}'}\n"
                           "finalJob: {command: 'curl -H ${BP_SECRET_TOKEN} {tok} ${BP_UNSET_IN_PREPARE} {payloadName}'}\n"))
    final = final_job_from_config(c)
    assert final is not None
    assert final.command == "curl -H ${BP_SECRET_TOKEN} ${BP_SECRET_TOKEN} ${BP_UNSET_IN_PREPARE} batchprod"
    assert c.get("project") == "p-hunter2"  # other keys keep ${ENV} substitution
    frozen = yaml.safe_dump(c.to_dict())
    assert "hunter2" not in frozen and "${BP_SECRET_TOKEN}" in frozen
    assert os.environ["BP_SECRET_TOKEN"] == "hunter2"


def test_a_directory_given_as_the_submit_file_says_what_it_is(d: Path) -> None:
    run = d / "submit" / "run1"
    run.mkdir(parents=True)
    (run / "state.db").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"a run's submit directory, not a submit file: run or continue it with "
                                          r"'batchprod restart .*run1'"):
        load_config(run)
    with pytest.raises(ConfigError, match=r"submit: a directory, not a submit file$"):
        load_config(d / "submit")
