"""A job attempt's stdout and stderr: find them, print them, follow them while the attempt runs.

Log paths come from the state store, which a damaged or tampered run could point anywhere: a path
is read only if it resolves inside the run's submit directory (a log symlinked to /etc/passwd is
refused), and the file is opened without following a symlink swapped in after that check.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from batchprod.errors import RunError, WorkflowError
from batchprod.execution.states import JobState, RunState
from batchprod.state.run import Run

STREAMS = ("stdout", "stderr")
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)
CHUNK = 1 << 16
MAX_LINE = 1 << 20  # a longer line is printed in pieces


def _job(run: Run, job_name: str) -> dict[str, Any]:
    job = run.store.job_by_name(job_name)
    if job is not None:
        return job
    rows = run.store.job_columns("name", "label")
    names = [r[0] for r in rows]
    close = difflib.get_close_matches(job_name, names, n=1)
    starting = [n for n in names if n.startswith(job_name)][:3]  # 'coadd' -> coadd_tract0_patch0, ...
    if not starting:  # a task label run inside clusters: 'b' -> perDetector_detector0, ...
        with contextlib.suppress(RunError, WorkflowError):  # (a damaged workflow: no hint)
            groups = {g.name for g in run.workflow.groups if job_name in g.labels}
            starting = [n for n, lab in rows if lab in groups][:3]
    hint = (f" (did you mean '{close[0]}'?)" if close else
            f" (jobs named {', '.join(repr(n) for n in starting)}{', ...' if len(starting) == 3 else ''})"
            if starting else "")
    raise RunError(f"run '{run.name}': no job named '{job_name}'{hint}")


def _inside(run: Run, recorded: str | None, canonical: Path, what: str, job_name: str, number: int) -> Path:
    """The log path, resolved; refused if it leads outside the submit directory. A recorded path
    under another directory (the run was moved since) is replaced by the run's own log layout."""
    root = run.submit_dir
    p = Path(recorded) if recorded else canonical
    if not Path(os.path.normpath(p)).is_relative_to(root):
        p = canonical
    resolved = p.resolve()
    if not resolved.is_relative_to(root):
        raise RunError(f"run '{run.name}': {what} of job '{job_name}' attempt {number} ({p}) resolves to "
                       f"{resolved}, outside the run's submit directory {root}: not reading it")
    return resolved


def _attempt(run: Run, job: dict[str, Any], attempt: int | None) -> dict[str, Any]:
    rows = run.store.attempts(job["id"])
    if not rows:
        raise RunError(f"run '{run.name}': job '{job['name']}' has never run (status {job['status']})")
    if attempt is None:
        return rows[-1]
    for a in rows:
        if a["number"] == attempt:
            return a
    have = ", ".join(str(a["number"]) for a in rows)
    raise RunError(f"run '{run.name}': job '{job['name']}' has no attempt {attempt} (attempts: {have})")


def attempt_logs(run: Run, job_name: str, attempt: int | None = None) -> tuple[Path, Path, int]:
    """(stdout path, stderr path, attempt number) of one attempt of a job, the latest by default.
    The paths are resolved and inside the run's submit directory; the files may not exist yet."""
    job = _job(run, job_name)
    a = _attempt(run, job, attempt)
    out, err, _ = run.attempt_paths(job["label"], job["name"], a["number"])
    return (_inside(run, a["stdout"], out, "stdout", job["name"], a["number"]),
            _inside(run, a["stderr"], err, "stderr", job["name"], a["number"]), int(a["number"]))


class _Tail:
    """One log file read incrementally (opened when it appears, never through a final symlink)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self.fd: int | None = None
        self.pos = 0
        self.partial = b""

    def open(self) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise RunError(f"{self.path}: cannot read the {self.name} log: {exc.strerror or exc}") from None
        return True

    def read(self) -> Iterator[bytes]:
        """What was appended since the last read (everything, the first time), in chunks."""
        if not self.open():
            return
        assert self.fd is not None
        if os.fstat(self.fd).st_size < self.pos:  # rewritten: start again
            self.pos = 0
        while True:
            b = os.pread(self.fd, CHUNK, self.pos)
            if not b:
                return
            self.pos += len(b)
            yield b

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _status(run: Run, job_id: int, number: int) -> str:
    for a in run.store.attempts(job_id):
        if a["number"] == number:
            return str(a["status"])
    return ""


def print_logs(
    run: Run,
    job_name: str,
    attempt: int | None = None,
    out: IO[str] | None = None,
    follow: bool = False,
    poll: float = 0.5,
    stream: str = "both",
    header: bool = True,
) -> str:
    """Print an attempt's logs (the latest attempt by default): a header line per stream
    (``==> stderr: PATH (job J attempt N, STATUS) <==``), then its contents. With ``follow``, keep
    printing what is appended (whole lines; ``==> stderr (attempt N, STATUS) <==`` when the stream
    changes) until the attempt has ended (or its engine is gone) and the files stop growing, like
    ``tail -f`` ending with the job. Returns the attempt's status."""
    from batchprod.report.report import run_status

    if stream not in ("both", *STREAMS):
        raise ValueError(f"stream must be 'both', 'stdout' or 'stderr', not {stream!r}")
    out = out if out is not None else sys.stdout
    job = _job(run, job_name)
    if follow and attempt is None and not run.store.attempts(job["id"]) and run_status(run) == RunState.RUNNING:
        # following a job that has not started: wait for its first attempt (as tail -F waits for a file)
        out.write(f"==> job {job['name']} has not started ({job['status'].lower()}): waiting for it <==\n")
        out.flush()
        while not run.store.attempts(job["id"]) and run_status(run) == RunState.RUNNING:
            time.sleep(poll)
    stdout, stderr, number = attempt_logs(run, job_name, attempt)
    tails = [_Tail(s, p) for s, p in zip(STREAMS, (stdout, stderr), strict=True) if stream in ("both", s)]
    status = _status(run, job["id"], number)
    last: list[str | None] = [None]

    def title(t: _Tail, note: str = "") -> None:
        out.write(f"==> {t.name}: {t.path} (job {job['name']} attempt {number}, {status}){note} <==\n")
        last[0] = t.name

    def emit(t: _Tail, chunks: Iterable[bytes], final: bool = False) -> bool:
        """Print the whole lines of what was read; the rest waits for its newline (or the end)."""
        got = False
        for chunk in [*chunks, None] if final else chunks:
            data = t.partial + (chunk or b"")
            cut = len(data) if chunk is None or len(data) > MAX_LINE else data.rfind(b"\n") + 1
            data, t.partial = data[:cut], data[cut:]
            if not data:
                continue
            if header and last[0] != t.name:  # the stream changed while following: a short header
                out.write(f"==> {t.name} (attempt {number}, {status}) <==\n")
                last[0] = t.name
            text = data.decode(errors="replace")
            out.write(text + "\n" if chunk is None and not text.endswith("\n") else text)
            got = True
        out.flush()
        return got

    try:
        for t in tails:  # what is there now, under one header per stream
            if header:
                title(t, "" if t.open() else " (no file yet)" if follow else " (no file)")
            emit(t, t.read(), final=not follow)
        if not follow:
            return status
        ended = False
        while True:
            got = False
            for t in tails:
                got = emit(t, t.read()) or got
            if ended:
                if not got:  # ended, and the files stopped growing
                    break
                time.sleep(min(poll, 0.1))
                continue
            status = _status(run, job["id"], number)
            if status not in _ACTIVE or run_status(run) != RunState.RUNNING:
                ended = True  # one more pass for what was written before the end
                time.sleep(min(poll, 0.1))
            elif not got:
                time.sleep(poll)
        for t in tails:
            emit(t, (), final=True)
        return status
    finally:
        for t in tails:
            t.close()
