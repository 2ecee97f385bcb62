"""Helpers for campaign tests (ours and users'): toy submit configs over one toy repository, site
catalogs and campaign files; a campaign runner in a thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.runner import CampaignRunner
from batchprod.campaign.sites import engine_sites, load_catalog
from batchprod.campaign.spec import load_campaign
from batchprod.engine.health import HealthPolicy
from batchprod.testing import command_task, make_toy_repo, write_submit


class Toy:
    """Submit configs over one toy repository, a site catalog and campaign files, in ``root``."""

    def __init__(self, root: Path, visits: int = 4, detectors: int = 4) -> None:
        self.root = root
        self.repo = make_toy_repo(root / "repo", visits=range(1, visits + 1), detectors=range(detectors))

    def config(self, name: str, command: str = "sleep 0.2; cat {inputs.raw} > {outputs.calexp}", **keys: Any) -> str:
        pipe = {"tasks": {"work": command_task(["visit", "detector"], ["raw"], ["calexp"], command)}}
        keys.setdefault("payload", {"payloadName": "toy", "repo": str(self.repo), "outputRun": f"toy/{name}"})
        return str(write_submit(self.root / name, pipe, repo=self.repo, submitPath=str(self.root / "submit" / name),
                                **keys))

    def sites(self, sites: dict[str, dict[str, Any]]) -> Path:
        p = self.root / "sites.yaml"
        p.write_text(yaml.safe_dump({"sites": sites}))
        return p

    def campaign(self, name: str, steps: list[dict[str, Any]], **keys: Any) -> Path:
        p = self.root / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"campaign": name, **keys, "steps": steps}))
        return p


def runner(url: str, catalog: Path, **kw: Any) -> CampaignRunner:
    kw.setdefault("control_interval", 0.1)
    policy = kw.pop("policy", HealthPolicy(unanswered_for=2.0, probe_after=1.0))
    return CampaignRunner(CampaignDB(url), engine_sites(load_catalog(catalog)), policy=policy, **kw)


def create(url: str, path: Path, start: bool = True) -> None:
    db = CampaignDB(url)
    db.create(load_campaign(path))
    if start:
        db.command(load_campaign(path, check_configs=False).name, "start")


class Background:
    """A campaign runner in a thread (the operator's commands come from the test meanwhile)."""

    def __init__(self, r: CampaignRunner, forever: bool = True) -> None:
        self.r = r
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(forever,), daemon=True)
        self.thread.start()

    def _run(self, forever: bool) -> None:
        try:
            self.r.run(forever=forever, stop=lambda: self.stop_reason)
        except BaseException as exc:  # noqa: BLE001 (reported by stop())
            self.error = exc

    def stop(self) -> None:
        self.stop_reason = "test over"
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
