"""Campaign tests: a central database (SQLite file or a fresh PostgreSQL schema) and toy campaigns of
real submit configs over real local sites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from batchprod.campaign.testing import Toy
from batchprod.state.database import ENV_DB, select_db
from batchprod.state.testdb import use_db


@pytest.fixture(params=["sqlite", "postgresql"])
def central(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The central database's URL (also $BATCHPROD_DB, for the CLI and the jobs' own processes)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'central.db'}"
        monkeypatch.setenv(ENV_DB, url)
        select_db(None)
        yield url
        select_db(None)
        return
    yield from use_db("postgresql", monkeypatch)  # type: ignore[misc]


@pytest.fixture
def toy(tmp_path: Path) -> Toy:
    return Toy(tmp_path)
