"""Times and counts as operators read them, for every layer (the engine's run messages, the reports, the CLI)."""

from __future__ import annotations

import time
from datetime import datetime


def iso(ts: float | None) -> str:
    """A time as ISO 8601 in the local zone with its offset (what the operator's clock says), or ''."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def iso_now() -> str:
    """Now, as :func:`iso` writes a time (``2026-11-27T07:18:03+01:00``): one form in every line."""
    return iso(time.time())


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 job', '2 jobs', '12,345 jobs'."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
