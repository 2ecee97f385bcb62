"""The campaign file and the operators' commands under bad input: one line naming the file and key,
exit 2, nothing recorded; fuzzed loaders raise nothing but ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.spec import campaign_from_data, load_campaign
from batchprod.campaign.testing import Toy
from batchprod.errors import ConfigError


def _good(cfg: str) -> dict[str, Any]:
    return {"campaign": "c", "steps": [{"name": "a", "submit": [cfg]}, {"name": "b", "submit": [cfg]}]}


BAD: list[tuple[str, Any, str]] = [
    ("not a mapping", ["a"], "(top): expected a mapping"),
    ("unknown key", {"prority": 3}, "prority: unknown key (did you mean 'priority'?)"),
    ("no steps", {"steps": []}, "steps: List should have at least 1 item"),
    ("bad name", {"campaign": "a/b"}, "campaign: a campaign name is 1 to 64"),
    ("huge priority", {"priority": 10**12}, "priority: Input should be less than or equal to 1000000"),
    ("zero share", {"share": 0}, "share: Input should be greater than 0"),
    ("bad policy", {"onSiteDown": "kill"}, "onSiteDown: Input should be 'redispatch' or 'hold'"),
    ("bad duration", {"stuckAfter": "soon"}, "stuckAfter: expected a duration like 90s"),
    ("owner newline", {"owner": "a\nb"}, "owner: an owner name"),
    ("duplicate step", {"steps": [{"name": "a", "submit": ["X"]}, {"name": "a", "submit": ["X"]}]},
     "steps[1].name: step 'a' appears twice"),
    ("unknown dep", {"steps": [{"name": "a", "submit": ["X"]}, {"name": "b", "after": ["aa"], "submit": ["X"]}]},
     "steps[1].after: 'aa': no such step (did you mean 'a'?)"),
    ("later dep", {"steps": [{"name": "a", "after": ["b"], "submit": ["X"]}, {"name": "b", "submit": ["X"]}]},
     "steps[0].after: 'b': it must come before this step"),
    ("fraction", {"steps": [{"name": "a", "fraction": 1.5, "submit": ["X"]}]}, "steps[0].fraction: Input should be less than or equal to 1"),
    ("all excluded", {"steps": [{"name": "a", "sites": ["x"], "exclude": ["x"], "submit": ["X"]}]},
     "steps[0].exclude: excludes every pinned site"),
    ("step key", {"steps": [{"name": "a", "submitt": ["X"], "submit": ["X"]}]}, "steps[0].submitt: unknown key"),
    ("no submit", {"steps": [{"name": "a"}]}, "steps[0].submit: Field required"),
]


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_campaign_file_is_one_line_and_records_nothing(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                             what: str, change: Any, message: str) -> None:
    toy = Toy(tmp_path / "t", visits=1, detectors=1)
    cfg = toy.config("a")
    data = change if not isinstance(change, dict) else {**_good(cfg), **change}
    if isinstance(data, dict):
        for s in data.get("steps", []):
            s["submit"] = [cfg if p == "X" else p for p in s.get("submit", [])] if "submit" in s else s.get("submit")
            if s.get("submit") is None:
                del s["submit"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path / 'central.db'}"
    monkeypatch.setenv("BATCHPROD_DB", url)
    r = cli("campaign", "create", path)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"error: {path}: ") and message in line, line
    assert CampaignDB(url).campaigns() == []


def test_a_broken_submit_config_is_named_with_its_key(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = Toy(tmp_path / "t", visits=1, detectors=1)
    cfg = toy.config("a", requestMemory="lots")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_good(cfg)))
    monkeypatch.setenv("BATCHPROD_DB", f"sqlite:///{tmp_path / 'central.db'}")
    r = cli("campaign", "create", path)
    assert r.exit_code == 2 and cfg in r.output and "requestMemory" in r.output, r.output
    missing = tmp_path / "m.yaml"
    missing.write_text(yaml.safe_dump(_good(str(tmp_path / "nope.yaml"))))
    r = cli("campaign", "create", missing)
    assert r.exit_code == 2 and "steps[0].submit[0]: no such file" in r.output, r.output


@pytest.mark.parametrize("text", [b"\xff\xfe campaign: c", b"a: &a [*a, *a]\n", b"[" * 10_000])
def test_unreadable_campaign_files(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch, text: bytes) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    monkeypatch.setenv("BATCHPROD_DB", f"sqlite:///{tmp_path / 'central.db'}")
    r = cli("campaign", "create", path)
    assert r.exit_code == 2 and r.output.startswith(f"error: {path}") and "Traceback" not in r.output, r.output


def test_commands_on_unknown_campaigns_and_steps(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = Toy(tmp_path / "t", visits=1, detectors=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"campaign": "drp-2026", "steps": [{"name": "isr", "submit": [toy.config("a")]}]}))
    monkeypatch.setenv("BATCHPROD_DB", f"sqlite:///{tmp_path / 'central.db'}")
    assert cli("campaign", "create", path).exit_code == 0
    r = cli("campaign", "create", path)
    assert r.exit_code == 2 and "already exists" in r.output
    r = cli("campaign", "start", "drp-2025")
    assert r.exit_code == 2 and "no campaign 'drp-2025' (did you mean 'drp-2026'?)" in r.output, r.output
    r = cli("campaign", "resume", "drp-2026")
    assert r.exit_code == 2 and "is planned: cannot resume" in r.output
    r = cli("campaign", "gate", "release", "drp-2026", "ism")
    assert r.exit_code == 2 and "no step 'ism' (did you mean 'isr'?)" in r.output
    r = cli("campaign", "status")
    assert r.exit_code == 0 and "drp-2026" in r.output and "planned" in r.output
    r = cli("campaign", "reprioritize", "drp-2026", "-3")
    assert r.exit_code == 0 and "priority -3" in r.output, r.output
    assert cli("campaign", "cancel", "drp-2026").exit_code == 0
    r = cli("campaign", "reprioritize", "drp-2026", "5")
    assert r.exit_code == 2 and "cancelled: nothing to reprioritize" in r.output


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
_data = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.sampled_from(
                                                    ["campaign", "steps", "name", "submit", "after", "fraction",
                                                     "gate", "sites", "exclude", "priority", "share", "owner",
                                                     "onSiteDown", "stuckAfter", "simulation", "x"]), c, max_size=5)),
                     max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_data)
def test_fuzzed_campaign_data_is_ConfigError_or_valid(data: Any) -> None:  # noqa: N802
    try:
        campaign_from_data(data, Path("fuzz.yaml"))
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml: ") and "\n" not in str(exc)


def test_good_campaign_round_trips(tmp_path: Path) -> None:
    toy = Toy(tmp_path / "t", visits=1, detectors=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**_good(toy.config("a")), "stuckAfter": "2h", "priority": 4}))
    spec = load_campaign(path)
    assert spec.stuck_after == 7200 and spec.after(1) == ["a"] and spec.after(0) == []
