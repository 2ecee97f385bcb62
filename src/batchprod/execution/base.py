"""The job-protocol interface: how the engine knows an attempt's success and outputs.

Two protocols: :class:`batchprod.execution.protocol.NativeFiles` (attempt-scoped staging, checksums,
a committed manifest, fenced publication) and :class:`batchprod.execution.butler.ButlerJobs` (Rubin
jobs: success from the exit code and ``--summary``, outputs living in the Butler).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any


class JobProtocol(ABC):
    """Per run: what an ended attempt produced, and how to finish one an engine lost."""

    name: str = "base"

    @abstractmethod
    def outputs(self, result: Path) -> list[dict[str, Any]] | None:
        """Output records of an attempt whose payload ended well; None if it did not commit any
        (then the attempt failed, whatever its exit code said)."""

    @abstractmethod
    def post_job(self, spec: dict[str, Any], stderr: Path, staged: dict[str, str],
                 started: float) -> tuple[int, list[dict[str, Any]] | None]:
        """An attempt whose payload ended well on a node that did no post-job itself (a shell-script
        job run directly): do it here. Returns the exit code it ends with, and its outputs."""

    @abstractmethod
    def recover(self, result: Path, spec: Callable[[], dict[str, Any]]) -> list[dict[str, Any]] | None:
        """After an engine loss: roll the attempt's half-done post-job forward if its payload
        finished; its outputs if it is now committed, else None (it is run again)."""

    def cause(self, result: Path) -> str | None:
        """The payload's own account of a failed attempt, if the protocol keeps one (else the
        engine reads the attempt's logs)."""
        return None
