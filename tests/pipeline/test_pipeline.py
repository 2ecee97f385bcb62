from __future__ import annotations

import time
from pathlib import Path

import pytest

from batchprod.errors import ConfigError
from batchprod.pipeline import check_config_labels, load_pipeline


def test_load_orders_tasks_topologically(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("""
tasks:
  measure: {python: "batchprod.demo.tasks:measure", dimensions: [patch], inputs: [coadd], outputs: [cat]}
  coadd: {command: "cp {inputs.calexp} {outputs.coadd}", dimensions: [patch], inputs: calexp, outputs: coadd}
""")
    pipe = load_pipeline(p)
    assert pipe.labels == ["coadd", "measure"]
    assert pipe.overall_inputs() == ["calexp"]
    assert pipe.by_label["coadd"].inputs == ("calexp",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: {}", "a pipeline needs a mapping of at least one task"),
        ("tasks: {a: {dimensions: [v], inputs: [r], outputs: [x]}}", "give exactly one of 'python'"),
        ("tasks: {a: {python: 'nocolon', inputs: [r], outputs: [x]}}", r"key 'tasks\.a\.python': expected 'module:function'"),
        ("tasks: {a: {command: 'true', inputs: [r], outputs: []}}", "must produce at least one dataset type"),
        ("tasks: {a: {command: 'true', inputs: [r], outputs: [x], flavour: 1}}", "unknown key 'flavour'"),
        ("tasks: {a: {command: 'true', inputs: ['bad name'], outputs: [x]}}", "expected a list of names"),
        ("tasks: {a: {command: 'true'}}\nextra: 1", "unknown key 'extra'"),
        ("tasks: [1, 2", "invalid YAML"),
    ],
)
def test_bad_pipelines(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(p)


# -- issue 8: bad input and bad actors ---------------------------------------------------------------
def _fails(p: Path, pattern: str) -> str:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=pattern) as info:
        load_pipeline(p)
    assert time.monotonic() - t0 < 2
    msg = str(info.value)
    assert "\n" not in msg and str(p) in msg, msg
    return msg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: {'../../../x': {command: 'true', outputs: [x]}}", r"key 'tasks': task label '\.\./\.\./\.\./x' must start with a letter"),
        ("tasks: {%s: {command: 'true', outputs: [x]}}" % ("a" * 300), r"key 'tasks': task label 'a+\.\.\. must start"),
        ('tasks: {"a\\nb": {command: "true", outputs: [x]}}', r"key 'tasks': task label 'a\\nb' must start"),
        ("tasks: {finalJob: {command: 'true', outputs: [x]}}", r"key 'tasks': task label 'finalJob' is reserved"),
        ("tasks: {_a: {command: 'true', outputs: [x]}}", r"task label '_a' must start with a letter"),
        ("tasks: {1: {command: 'true', outputs: [x]}}", r"key 'tasks': task label 1 must start"),
        ("tasks: {a: {command: 'true', outputs: ['../x']}}", r"key 'tasks\.a\.outputs': expected a list of names; dataset type '\.\./x'"),
        ("tasks: {a: {command: 'true', inputs: ['%s'], outputs: [x]}}" % ("r" * 65), r"key 'tasks\.a\.inputs': .*dataset type 'r+"),
        ("tasks: {a: {command: 'true', dimensions: ['vi-sit'], outputs: [x]}}", r"key 'tasks\.a\.dimensions': .*dimension 'vi-sit'"),
        ("tasks: {a: {command: 3, outputs: [x]}}", r"key 'tasks\.a\.command': Input should be a valid string, got 3"),
        ("tasks: {a: {python: [m], outputs: [x]}}", r"key 'tasks\.a\.python': Input should be a valid string"),
        ("tasks: {a: {command: x, outputs: [x], config: 3}}", r"key 'tasks\.a\.config': Input should be a valid dictionary"),
        ("tasks: {a: {command: x, outputs: [x], config: {1: 2}}}", r"key 'tasks\.a\.config': Input should be a valid string"),
        ("tasks: {a: {command: x, outputs: [x], config: {t: .nan}}}", r"key 'tasks\.a\.config\.t': expected a finite number"),
        ("tasks: {a: {command: x, outputs: [x], config: {t: 2024-01-01}}}", r"key 'tasks\.a\.config\.t': unsupported value of type date"),
        ("tasks: {a: {command: x, outputs: [x], config: {t: %s}}}" % ("9" * 25), r"key 'tasks\.a\.config\.t': integer .* out of range"),
        ("tasks: {a: {command: x, outputs: [x], comand: y}}", r"key 'tasks\.a': unknown key 'comand' \(did you mean 'command'\?\)"),
        ("tasks: {a: {command: x, outputs: [x]}}\ndescription: [1]", r"key 'description': expected a string"),
        ("tasks: {a: 5}", r"key 'tasks\.a': expected a mapping, got 5"),
        ("tasks: {a: {python: 'nosuch_mod_zz:f', outputs: [x]}}", r"key 'tasks\.a\.python': module 'nosuch_mod_zz' not found"),
        ("tasks: {a: {python: 'nosuch_pkg_zz.sub:f', outputs: [x]}}", r"key 'tasks\.a\.python': module 'nosuch_pkg_zz\.sub' not found"),
        ("tasks: {a: {python: 'batchprod.testing:nosuch', outputs: [x]}}", r"key 'tasks\.a\.python': module 'batchprod\.testing' has no 'nosuch'"),
        ("tasks: {a: {python: 'batchprod.testing:REGISTRY_FILE', outputs: [x]}}", r"key 'tasks\.a\.python': .* is not a function"),
        ("tasks: {a: {command: x, outputs: [x]}, a: {command: y, outputs: [y]}}", r"line 1 invalid YAML: duplicate key 'a'"),
        ('tasks: {a: {command: "cat\\0 x", outputs: [x]}}', r"line 1 invalid YAML: NUL character in a string"),
        ("tasks: {a: {command: x, outputs: [x], config: " + "[" * 10000 + "]" * 10000 + "}}", r"invalid YAML: exceeded maximum nesting depth"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    _fails(p, message)


def test_alias_bomb_non_utf8_and_raw_nul(tmp_path: Path) -> None:
    bomb = 'x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    bomb += "".join(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    p = tmp_path / "p.yaml"
    p.write_text("description: d\ntasks:\n  a:\n    command: x\n    outputs: [x]\n    config:\n"
                 + "".join("      " + line + "\n" for line in bomb.splitlines()))
    _fails(p, r"line \d+ invalid YAML: document larger than 200000 nodes")
    p.write_bytes(b"tasks: {a: {command: 'caf\xe9', outputs: [x]}}\n")
    _fails(p, r"line 1: not UTF-8 text \(byte 0xe9\)")
    p.write_bytes(b"tasks: {a: {command: 'a\0b', outputs: [x]}}\n")
    _fails(p, r"invalid YAML: byte \d+: control characters are not allowed")


def test_env_in_a_command_stays_literal_for_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_SECRET_TOKEN", "hunter2")
    p = tmp_path / "p.yaml"
    p.write_text("tasks: {a: {command: 'tool --token ${BP_SECRET_TOKEN} {outputs.x}', outputs: [x]}}\n")
    assert load_pipeline(p).by_label["a"].command == "tool --token ${BP_SECRET_TOKEN} {outputs.x}"


def test_safe_names_with_hyphens_load(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("tasks:\n  make-coadd_2: {python: 'batchprod.testing:alloc_task', dimensions: [patch],"
                 " inputs: raw-img, outputs: [deep-Coadd_v2], config: {a: [1, {b: null}]}}\n")
    pipe = load_pipeline(p)
    assert pipe.by_label["make-coadd_2"].outputs == ("deep-Coadd_v2",)
    assert pipe.by_label["make-coadd_2"].config == {"a": [1, {"b": None}]}


# -- config labels against the pipeline --------------------------------------------------------------
def _cfg(tmp_path: Path, text: str):
    from batchprod.config import load_config

    (tmp_path / "pipeline.yaml").write_text(
        "tasks:\n  calibrate: {command: x, dimensions: [v], inputs: [raw], outputs: [calexp]}\n"
        "  coadd: {command: x, dimensions: [p], inputs: [calexp], outputs: [deep]}\n")
    (tmp_path / "s.yaml").write_text("pipelineYaml: pipeline.yaml\n" + text)
    cfg = load_config(tmp_path / "s.yaml")
    return cfg, load_pipeline(cfg.resolve_path("pipelineYaml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipetask: {calibrat: {requestCpus: 2}}",
         r"s\.yaml: key 'pipetask\.calibrat': unknown task label 'calibrat' \(pipeline .*pipeline\.yaml has: calibrate, coadd\) \(did you mean 'calibrate'\?\)"),
        ("cluster: {c: {pipetasks: 'calibrate,nosuch'}}", r"s\.yaml: key 'cluster\.c\.pipetasks': unknown task label 'nosuch'"),
        ("cluster: {c: {pipetasks: ''}}", r"key 'cluster\.c\.pipetasks': lists no task"),
        ("cluster: {c: {requestCpus: 1}}", r"key 'cluster\.c\.pipetasks' is required"),
        ("cluster: {c: {pipetasks: calibrate}, d: {pipetasks: calibrate}}", r"task 'calibrate' is in two clusters: 'c' and 'd'"),
        ("cluster: {coadd: {pipetasks: calibrate}}", r"key 'cluster\.coadd': cluster name 'coadd' is the label of a task outside it"),
    ],
)
def test_config_labels_must_exist_in_the_pipeline(tmp_path: Path, text: str, message: str) -> None:
    cfg, pipe = _cfg(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=message):
        check_config_labels(cfg, pipe)


def test_config_labels_that_exist_pass(tmp_path: Path) -> None:
    cfg, pipe = _cfg(tmp_path, "pipetask: {coadd: {requestCpus: 2}}\ncluster: {calibrate: {pipetasks: calibrate}}\n")
    check_config_labels(cfg, pipe)
