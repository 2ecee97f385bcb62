"""The operators' event log: one JSON object per line for every campaign, step, run, site and incident
state change. The rows are those of the ``ops_event`` table (whoever made the change: an operator's
command in another process, the dispatcher), exported in order by the dispatcher at each control
round; each line carries the row's ``id``, and a dispatcher started again goes on after the file's
last one (no line twice, none missed).

Lines are appended with one ``write`` each on an ``O_APPEND`` descriptor, so two writers never interleave
inside a line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events to a JSON-lines file (created ``0600``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def last_id(self) -> int:
        """The id of the last event in the file (0: none)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 65536))
                lines = fh.read().splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                return int(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def write(self, row: Mapping[str, Any]) -> None:
        now = row["time"]
        line = json.dumps({
            "id": row["id"], "time": datetime.fromtimestamp(now).astimezone().isoformat(timespec="milliseconds"),
            "epoch": round(now, 3), "kind": row["kind"], "subject": row["subject"], "state": row["state"],
            "message": row["message"],
        }, ensure_ascii=False)
        os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
