"""The function Parsl workers run per attempt, called directly (no executor needed)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from batchprod.wms.parsl.task import run_attempt


def test_runs_in_own_session_records_pid_and_streams(tmp_path: Path) -> None:
    out, err, pid = tmp_path / "o", tmp_path / "e", tmp_path / "pid"
    rc = run_attempt(["/bin/sh", "-c", 'echo "$X"; ps -o sid= -p $$ >&2; exit 3'], {"X": "hello"},
                     str(out), str(err), None, str(pid))
    assert rc[0] == 3 and rc[1]
    assert out.read_text() == "hello\n"
    recorded = int(pid.read_text())
    assert int(err.read_text().split()[0]) == recorded  # session leader: its own session, not the worker's
    assert recorded != os.getsid(0)
    assert not (tmp_path / "pid.tmp").exists()


def test_signal_is_negative_status_and_stdin_is_passed(tmp_path: Path) -> None:
    spec = tmp_path / "in"
    spec.write_text("payload\n")
    rc = run_attempt([sys.executable, "-c", "import sys; print(sys.stdin.read().strip())"], {},
                     str(tmp_path / "o"), str(tmp_path / "e"), str(spec), None)
    assert rc[0] == 0 and (tmp_path / "o").read_text() == "payload\n"

    pid_path = tmp_path / "pid"
    result: list[tuple[int, str]] = []
    t = threading.Thread(target=lambda: result.append(run_attempt(
        ["/bin/sh", "-c", "exec sleep 30"], {}, str(tmp_path / "o2"), str(tmp_path / "e2"), None, str(pid_path))))
    t.start()
    deadline = time.monotonic() + 10
    while not pid_path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(int(pid_path.read_text()), signal.SIGKILL)
    t.join(10)
    assert [r[0] for r in result] == [-signal.SIGKILL]
