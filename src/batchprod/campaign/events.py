"""The operators' event log: one JSON object per line for every campaign, step, run, site and incident
state change (the ``ops_event`` table holds the same rows; the file is for log shippers and ``tail -f``).

Lines are appended with one ``write`` each on an ``O_APPEND`` descriptor, so two writers never interleave
inside a line, and flushed at once: a crash loses no event already reported elsewhere.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path


class EventLog:
    """Appends events to a JSON-lines file (created ``0600``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, now: float, kind: str, subject: str, state: str, message: str | None) -> None:
        line = json.dumps({
            "time": datetime.fromtimestamp(now).astimezone().isoformat(timespec="milliseconds"),
            "epoch": round(now, 3), "kind": kind, "subject": subject, "state": state, "message": message,
        }, ensure_ascii=False)
        os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
