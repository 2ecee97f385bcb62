"""Shared fixtures: a toy repository of text files and a helper to run the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from batchprod.cli import main
from batchprod.testing import make_toy_repo


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    return make_toy_repo(tmp_path / "repo")


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke
