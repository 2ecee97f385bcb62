"""What a Parsl worker runs for one attempt. Standard library only: every worker imports it.

A Python app rather than a Parsl bash app: a bash app costs a ``bash`` (and here a ``setsid``) process
per attempt and writes Parsl's own banner into the job's stderr; this starts the job's command in a
session of its own directly, so a kill reaches its whole process tree and nothing else.
"""

from __future__ import annotations


def run_attempt(argv: list[str], env: dict[str, str], out_path: str, err_path: str, in_path: str | None,
                pid_path: str | None) -> tuple[int, str]:
    """Run ``argv`` to its end; returns its exit status (negative: killed by that signal) and the host.

    With ``pid_path`` the command gets a new session and its pid is recorded there (atomically, so a
    reader sees a whole pid or none); without it the command (the job wrapper) does both itself.
    (Not named stdout/stderr: Parsl treats parameters of those names as its own.)"""
    import os
    import socket
    import subprocess

    with open(out_path, "ab") as out, open(err_path, "ab") as err, open(in_path or os.devnull, "rb") as inp:
        proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, env={**os.environ, **env},
                                start_new_session=pid_path is not None)
    if pid_path is not None:
        tmp = f"{pid_path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(str(proc.pid))
        os.replace(tmp, pid_path)
    return proc.wait(), socket.gethostname()
