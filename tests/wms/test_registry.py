"""Finding a WMS plugin: entry-point names, ``module:Class`` and ctrl_bps's dotted class paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchprod.errors import ConfigError
from batchprod.testing import write_submit
from batchprod.wms.local import LocalService
from batchprod.wms.registry import get_wms


@pytest.mark.parametrize("name", ["local", "batchprod.wms.local:LocalService", "batchprod.wms.local.LocalService"])
def test_a_wms_by_name_or_class_path(name: str) -> None:
    assert isinstance(get_wms(name), LocalService)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("os:system", r"wmsServiceClass 'os:system' is not a WMS service class"),
        ("os.system", r"wmsServiceClass 'os.system' is not a WMS service class"),
        ("batchprod.wms.base:BaseWmsService", r"is not a WMS service class"),
        ("nosuch_pkg_x:Service", r"wmsServiceClass 'nosuch_pkg_x:Service': module 'nosuch_pkg_x' not found"),
        ("batchprod.wms.local:Nope", r"module 'batchprod\.wms\.local' has no 'Nope'"),
        ("nosuch", r"unknown WMS \(installed: .*local"),
    ],
)
def test_what_is_not_a_wms_is_one_config_error(value: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        get_wms(value)


@pytest.mark.parametrize("where", ["top", "site"])
def test_prepare_names_the_key_and_writes_nothing(tmp_path: Path, toy_repo: Path, cli, where: str) -> None:
    keys = ({"wmsServiceClass": "os:system"} if where == "top"
            else {"computeSite": "x", "site": {"x": {"wmsServiceClass": "os:system"}}})
    cfg = write_submit(tmp_path, repo=toy_repo, **keys)
    r = cli("prepare", cfg)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    key = "wmsServiceClass" if where == "top" else "site.x.wmsServiceClass"
    assert f"key '{key}'" in lines[0] and "is not a WMS service class" in lines[0] and str(cfg) in lines[0]
    assert not (tmp_path / "submit").exists()
