"""A WMS plugin that fails to load: the loader names the plugin and its exception (never the misleading
"unknown key" of a key only that plugin declares), a failure is not kept for the life of the process,
and a broken plugin no site uses stops nothing."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchprod.config import load_config
from batchprod.config.keys import SITE_KEYS
from batchprod.errors import ConfigError

BROKEN = "bp_test_broken_wms"
WHY = "NameError: name 'RunError' is not defined"


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The installed ``batchprod.wms`` entry points, with ``parsl`` (or an extra plugin) replaceable by
    one whose module fails on import as a half-edited source file does; the key table starts afresh."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{BROKEN}.py").write_text("class SubmitRefused(RunError):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    real = list(metadata.entry_points(group="batchprod.wms"))
    state: dict[str, Any] = {"eps": real}

    def entry_points(**kw: Any) -> Any:
        assert kw == {"group": "batchprod.wms"}
        return state["eps"]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(SITE_KEYS, "_table", None)
    monkeypatch.setattr(SITE_KEYS, "_broken", {})

    def broken(name: str, replace: bool = True) -> None:
        ep = metadata.EntryPoint(name=name, value=f"{BROKEN}:Service", group="batchprod.wms")
        state["eps"] = [e for e in real if not (replace and e.name == name)] + [ep]

    def fixed() -> None:
        state["eps"] = real

    return {"broken": broken, "fixed": fixed}


def _cfg(tmp_path: Path, extra: dict[str, Any]) -> Any:
    data = {"qgraphFile": "g.qg", "payload": {"payloadName": "t", "butlerConfig": "/repo"}, **extra}
    p = tmp_path / "bps.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_config(p)


PARSL_LOCAL = {"wmsServiceClass": "lsst.ctrl.bps.parsl.ParslService", "computeSite": "local",
               "site": {"local": {"class": "lsst.ctrl.bps.parsl.sites.Local", "cores": 2}}}


def test_a_site_of_a_plugin_that_fails_to_load_names_the_plugin_and_its_exception(
        tmp_path: Path, plugins: dict[str, Any]) -> None:
    plugins["broken"]("parsl")
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, PARSL_LOCAL)
    msg = str(info.value)
    assert f"key 'site.local.wmsServiceClass' (site 'local'): WMS plugin 'parsl' ({BROKEN}:Service) cannot be " \
           f"loaded: {WHY}" in msg
    assert "unknown key" not in msg


def test_an_unknown_site_key_names_the_plugins_that_failed_to_load(tmp_path: Path, plugins: dict[str, Any]) -> None:
    plugins["broken"]("parsl")
    with pytest.raises(ConfigError, match=re.escape(
            "unknown key 'site.local.parslProvider'; WMS plugins that failed to load, whose keys are not known: "
            f"'parsl' ({BROKEN}:Service): {WHY}")):
        _cfg(tmp_path, {"site": {"local": {"parslProvider": "local"}}})  # (the site's WMS is local)


def test_a_failed_load_is_tried_again_at_the_next_config(tmp_path: Path, plugins: dict[str, Any]) -> None:
    plugins["broken"]("parsl")
    with pytest.raises(ConfigError, match="WMS plugin 'parsl'"):
        _cfg(tmp_path, PARSL_LOCAL)
    plugins["fixed"]()  # the file is saved, the plugin reinstalled: no restart of the process needed
    cfg = _cfg(tmp_path, PARSL_LOCAL)
    assert cfg.data["site"]["local"] == {"wmsServiceClass": "parsl", "parslProvider": "local", "maxWorkers": 2}
    assert SITE_KEYS.broken() == {}


def test_a_broken_plugin_no_site_uses_stops_nothing(tmp_path: Path, plugins: dict[str, Any]) -> None:
    plugins["broken"]("extra", replace=False)
    cfg = _cfg(tmp_path, PARSL_LOCAL)
    assert cfg.data["site"]["local"]["parslProvider"] == "local"
    assert SITE_KEYS.broken() == {"extra": (f"{BROKEN}:Service", WHY)}
