"""Times as operators read them, for every layer (the engine's run messages, the reports, the CLI)."""

from __future__ import annotations

from datetime import datetime


def iso(ts: float | None) -> str:
    """A time as ISO 8601 in the local zone with its offset (what the operator's clock says), or ''."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
