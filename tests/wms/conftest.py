"""Backends for the conformance suite: every backend that can run here, one parametrized fixture.

Slurm runs when a cluster answers (``scripts/dev-slurm.sh up``; ``.ci/run`` starts one). With
``BATCHPROD_REQUIRE_ENGINES=1`` (as in CI) a missing engine is a failure, not a skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchprod.testing import SLURM_CONF, wait_for
from batchprod.testing import slurm_up as _slurm_up


@dataclass
class BackendCase:
    name: str
    keys: dict[str, Any] = field(default_factory=dict)

    def runs_payloads(self) -> None:
        """Skip for the fake site: it runs no payload (no stderr, memory, sleep or kill to observe)."""
        if self.name == "fake":
            pytest.skip("the fake site runs no payload")

    def kill_from_outside(self, attempt: dict[str, Any]) -> None:
        """What a preemption or an operator's kill looks like on this backend."""
        if self.name == "local":
            os.killpg(int(attempt["handle"]), signal.SIGKILL)
        elif self.name == "slurm":
            subprocess.run(["scancel", str(attempt["handle"])], check=True, env=dict(os.environ, SLURM_CONF=SLURM_CONF))
        else:  # parsl: the wrapper's own process group, as a node's OOM killer or an operator would
            # the worker records the pid just after the start, so the job may print before it exists
            pid_path = Path(attempt["stdout"].removesuffix(".out") + ".pid")
            wait_for(pid_path.exists, timeout=10)
            os.killpg(int(pid_path.read_text()), signal.SIGKILL)


def _require(what: str) -> None:
    if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
        pytest.fail(f"{what} is required here (BATCHPROD_REQUIRE_ENGINES=1) but is not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(params=["local", "slurm", "parsl-local", "parsl-slurm", "fake"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> BackendCase:
    if request.param.startswith("parsl"):
        try:
            import parsl  # noqa: F401
        except ImportError:
            _require("parsl")
        provider = request.param.removeprefix("parsl-")
        if provider == "slurm":
            if not _slurm_up():
                _require("Slurm")
            monkeypatch.setenv("SLURM_CONF", SLURM_CONF)
        return BackendCase("parsl", {"computeSite": request.param, "site": {request.param: {
            "wmsServiceClass": "parsl", "parslProvider": provider, "maxWorkers": 4}}})
    if request.param == "slurm":
        if not _slurm_up():
            if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
                pytest.fail("Slurm is required here (BATCHPROD_REQUIRE_ENGINES=1) but does not answer")
            pytest.skip("no Slurm cluster (start one with scripts/dev-slurm.sh up)")
        monkeypatch.setenv("SLURM_CONF", SLURM_CONF)
        return BackendCase("slurm", {"computeSite": "slurm",
                                     "site": {"slurm": {"wmsServiceClass": "slurm", "pollInterval": 0.2}}})
    if request.param == "fake":  # the packaged FakeBackend: every job succeeds at once, outputs written
        return BackendCase("fake", {"wmsServiceClass": "fake"})
    return BackendCase("local", {"site": {"local": {"cores": 2}}})
