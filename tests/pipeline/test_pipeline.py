from __future__ import annotations

from pathlib import Path

import pytest

from batchprod.errors import ConfigError
from batchprod.pipeline import load_pipeline


def test_load_orders_tasks_topologically(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("""
tasks:
  measure: {python: "m:f", dimensions: [patch], inputs: [coadd], outputs: [cat]}
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
