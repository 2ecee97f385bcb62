"""The native file job protocol: how an attempt's outputs become the run's, exactly once.

An attempt writes into attempt-scoped staging; post-job checksums the outputs, writes a manifest
(``.pending``), renames the outputs into place and commits the manifest (``result.json``), holding the
job's fence so that a superseded attempt never publishes over its replacement. Restart rolls a
half-done publication forward. (Butler jobs will be another protocol: success from exit code and
summary, outputs in the Butler.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchprod.execution.base import JobProtocol

#: exit code for a payload that raised MemoryError: reported as ``oom``
EXIT_MEMORY_ERROR = 86


#: exit code when a quantum claims success but did not write an output: ``user_error``
EXIT_MISSING_OUTPUT = 87


#: exit code for stage-in or stage-out failure: ``infrastructure``
EXIT_INFRASTRUCTURE = 89


#: payload signals that mean "stopped from outside" rather than "crashed"
KILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class StageError(Exception):
    """Stage-in or stage-out failed: the data system's fault, not the payload's."""


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _staged(spec: dict[str, Any], r: dict[str, Any], attempt: Any) -> str:
    """Where an attempt writes an output before publication: ``<run>/_staging/<type>/<name>.a<N><ext>``
    (flat per dataset type: no directory to create or remove per job)."""
    stem, ext = os.path.splitext(os.path.basename(r["path"]))
    return os.path.join(spec["repo"], spec["output_run"], "_staging", r["dataset_type"], f"{stem}.a{attempt}{ext}")


def staged_quantum(q: dict[str, Any], staged: dict[str, str]) -> dict[str, Any]:
    """The quantum with outputs pointing into staging and inputs made in this job read from there."""
    return {
        **q,
        "inputs": [{**r, "path": staged.get(r["path"], r["path"])} for r in q["inputs"]],
        "outputs": [{**r, "path": staged[r["path"]]} for r in q["outputs"]],
    }


class MissingOutput(Exception):
    """A quantum ended well but did not write an output it declared."""


def collect_outputs(q: dict[str, Any], staged: dict[str, str]) -> list[dict[str, Any]]:
    """Output records of a finished quantum (final path, staged path, size, checksum)."""
    out = []
    for r in q["outputs"]:
        p = staged[r["path"]]
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise MissingOutput(f"{q['label']} {q['data_id']}: output '{r['dataset_type']}' was not written: {p}") from None
        out.append({**r, "staged": p, "node_id": q["node_id"], "size": size, "checksum": file_checksum(p)})
    return out


FINAL_NODE = "finalJob"  # node id of the final job's outputs (it has no quantum); = FinalJob.NAME, not imported: the wrapper stays light


def final_outputs(final: dict[str, Any]) -> list[dict[str, Any]]:
    """Output records of the files the final job declared (written in place: it runs alone, last)."""
    out = []
    for r in final.get("outputs") or []:
        try:
            size = os.stat(r["path"]).st_size
        except FileNotFoundError:
            print(f"error: finalJob: declared output '{r['dataset_type']}' was not written: {r['path']}",
                  file=sys.stderr)
            raise SystemExit(EXIT_MISSING_OUTPUT) from None
        out.append({**r, "staged": r["path"], "node_id": FINAL_NODE, "size": size, "checksum": file_checksum(r["path"])})
    return out


def staging_map(spec: dict[str, Any]) -> dict[str, str]:
    """Final output path -> where this attempt stages it."""
    attempt = spec.get("attempt", 1)
    return {r["path"]: _staged(spec, r, attempt) for q in spec["quanta"] for r in q["outputs"]}


def complete_after_loss(spec: dict[str, Any]) -> bool:
    """Restart: finish post-job for a shell-script job whose commands completed (marker present)
    while no orchestrator was there to do it. True if the attempt is now committed."""
    marker = f"{spec['result_path']}.exit"
    try:
        with open(marker) as fh:
            if fh.read().strip() != "0":
                return False
    except OSError:
        return False
    staged = staging_map(spec)
    try:
        outputs = [o for q in spec["quanta"] for o in collect_outputs(q, staged)]
        finish_attempt(spec, outputs, 0.0)
    except (MissingOutput, StageError, OSError):
        return False
    return True


def finish_attempt(spec: dict[str, Any], outputs: list[dict[str, Any]], seconds: float, durable: bool = True,
                   fenced: bool = True) -> None:
    """Post-job: write the manifest, publish the outputs, commit; then drop the staging directory.

    Raises StageError when storage fails (full, read-only, gone: ``infrastructure``, not the
    payload's fault), FencedOff (after removing what this attempt staged) when a later attempt of
    the job was started: a superseded attempt never publishes over its replacement. ``fenced=False``
    is for the engine's own post-job (it publishes only the attempt it holds current, and a dead
    engine publishes nothing): no fence file to open and lock for every job."""
    result_path = spec.get("result_path")
    if result_path:
        attempt = spec.get("attempt")
        try:
            with _publication(result_path, attempt) if fenced else contextlib.nullcontext():
                manifest = {"outputs": outputs, "seconds": seconds, "attempt": attempt}
                _write_json(f"{result_path}.pending", manifest, durable, direct=True)
                _publish(result_path, manifest)
        except FencedOff:
            _drop(o["staged"] for o in outputs if o.get("node_id") != FINAL_NODE)
            raise
        except OSError as exc:
            raise StageError(f"stage-out: cannot write the result manifest {result_path}.pending: {exc}") from None
        with contextlib.suppress(OSError):
            os.unlink(f"{result_path}.exit")
    _clean_staging(spec)


def stage_in_check(spec: dict[str, Any]) -> None:
    produced = {r["path"] for q in spec["quanta"] for r in q["outputs"]}
    for q in spec["quanta"]:
        for r in q["inputs"]:
            if r["path"] not in produced and not os.path.exists(r["path"]):
                raise StageError(f"stage-in: input {r['dataset_type']} {r['data_id']} missing: {r['path']}")


def _write_json(path: str | Path, data: Any, durable: bool = True, direct: bool = False) -> None:
    """Write JSON atomically (temporary name + rename), or ``direct`` when ``path`` is itself a
    temporary name that only a later rename makes visible (the pending manifest)."""
    tmp = str(path) if direct else f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data))  # one write; json.dump writes every token separately
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    if not direct:
        os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """A JSON file's content; None if it is missing, unreadable or not JSON (a protocol's files are
    read after crashes: half a file is no file)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def manifest_outputs(result: str | Path, when_absent: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The output records of an attempt's committed result manifest, None if there is none usable;
    ``when_absent`` for a manifest without an 'outputs' entry."""
    manifest = read_json(result)
    outs = manifest.get("outputs", when_absent) if isinstance(manifest, dict) else None
    return outs if isinstance(outs, list) else None


class FencedOff(StageError):
    """A later attempt of the job was started: this one must not publish (it may be a zombie that
    outlived an orchestrator's recovery, its replacement already running or done)."""


def fence_path(result_path: str | Path, attempt: Any) -> str:
    """The job's fence: ``<logs>/<label>/<name>.fence`` next to its attempts' files. It lists the
    attempts started (one line each, appended), and its lock orders publications of the job."""
    result_path = str(result_path)
    suffix = f".{attempt}.result.json"
    base = result_path[: -len(suffix)] if result_path.endswith(suffix) else result_path.removesuffix(".result.json")
    return f"{base}.fence"


def write_fence(result_path: str | Path, attempt: Any) -> None:
    """Before an attempt starts: make it the job's current one, so no earlier attempt still running
    can publish any more (whoever starts attempts calls this; a first attempt has nothing to fence).
    One appended line: a reader never sees half a number (it ignores an unfinished last line)."""
    if not isinstance(attempt, int) or attempt <= 1:
        return
    fd = os.open(fence_path(result_path, attempt), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{attempt}\n".encode())
    finally:
        os.close(fd)


def _latest_started(fd: int) -> int:
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
    return max((int(x) for x in data.split(b"\n")[:-1] if x.strip().isdigit()), default=0)


@contextlib.contextmanager
def _publication(result_path: str | Path, attempt: Any) -> Any:
    """Hold the job's publication lock (a POSIX lock on its fence: it holds across hosts on NFS);
    raise FencedOff if a later attempt than ``attempt`` was started. Check and publication are one
    step for every other attempt of the job: a newer attempt's publication waits for an older one
    that got in first, so the newer always publishes last."""
    import fcntl

    path = fence_path(result_path, attempt)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StageError(f"stage-out: cannot open the job's fence {path}: {exc}") from None
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: the check still happens
            fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            mine = int(attempt)
        except (TypeError, ValueError):
            mine = None
        latest = _latest_started(fd) if mine is not None else 0
        if mine is not None and latest > mine:
            raise FencedOff(f"fenced off: attempt {mine} was superseded by attempt {latest} of the same job; "
                            f"its outputs are not published ({path})")
        yield
    finally:
        os.close(fd)  # drops the lock


def _append_line(path: Path, line: str) -> None:
    with contextlib.suppress(OSError), open(path, "a") as fh:
        fh.write(line + "\n")


def _drop(paths: Any) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def commit_outputs(result_path: str | Path) -> dict[str, Any]:
    """Publish the outputs listed in ``<result>.pending`` and commit the manifest; idempotent, so
    restart can roll a half-done publication forward. Raises StageError if an output cannot move,
    FencedOff (dropping the manifest and what it staged) if a later attempt of the job was started."""
    pending = f"{result_path}.pending"
    with open(pending) as fh:
        manifest = json.load(fh)
    try:
        with _publication(result_path, manifest.get("attempt")):
            return _publish(result_path, manifest)
    except FencedOff:
        _drop([*(o["staged"] for o in manifest["outputs"] if o.get("node_id") != FINAL_NODE), pending])
        raise


def _publish(result_path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Rename the staged outputs of ``<result>.pending`` (``manifest``) into place, then commit the
    manifest (under the job's publication lock)."""
    pending = f"{result_path}.pending"
    for o in manifest["outputs"]:
        staged, final = o["staged"], o["path"]
        try:
            os.replace(staged, final)
        except FileNotFoundError:
            if os.path.exists(staged):  # first output of its type: make the directory once
                try:
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(staged, final)
                except OSError as exc:
                    raise StageError(f"stage-out: cannot publish {final}: {exc}") from None
            elif not os.path.isfile(final):
                raise StageError(f"stage-out: {o['dataset_type']} {o['data_id']} is neither staged nor published") from None
        except OSError as exc:
            raise StageError(f"stage-out: cannot publish {final}: {exc}") from None
    try:
        os.replace(pending, result_path)
    except OSError as exc:
        raise StageError(f"stage-out: cannot commit the result manifest {result_path}: {exc}") from None
    return manifest


def _clean_staging(spec: dict[str, Any]) -> None:
    """After a committed attempt: remove what earlier (killed or failed) attempts of the job staged."""
    attempt = spec.get("attempt", 1)
    if not isinstance(attempt, int) or attempt <= 1:
        return
    for q in spec["quanta"]:
        for r in q["outputs"]:
            for a in range(1, attempt):
                with contextlib.suppress(OSError):
                    os.unlink(_staged(spec, r, a))


class NativeFiles(JobProtocol):
    """The native protocol: outputs are files published by the attempt's manifest (``result.json``)."""

    name = "files"

    def post_job(self, spec: dict[str, Any], stderr: Path, staged: dict[str, str],
                 started: float) -> tuple[int, list[dict[str, Any]] | None]:
        """Post-job of a shell-script job, done by the engine: outputs checked, checksummed, the
        manifest written and the outputs published, as the Python wrapper does on a node. Returns
        the exit code the attempt ends with and its outputs."""
        try:
            outputs = [o for q in spec["quanta"] for o in collect_outputs(q, staged)]
            # durable=False: the state store commits with synchronous=NORMAL too; a process kill keeps
            # both, only a power loss could lose the last few. Not fenced: the engine publishes only
            # the attempt it holds current, and a dead engine publishes nothing.
            finish_attempt(spec, outputs, time.time() - started, durable=False, fenced=False)
        except MissingOutput as exc:
            _append_line(stderr, f"error: {exc}")
            return EXIT_MISSING_OUTPUT, None
        except (StageError, OSError) as exc:
            _append_line(stderr, f"error: {exc}")
            return EXIT_INFRASTRUCTURE, None
        return 0, outputs

    def outputs(self, result: Path) -> list[dict[str, Any]] | None:
        return manifest_outputs(result, when_absent=[])

    def recover(self, result: Path, spec: Callable[[], dict[str, Any]]) -> list[dict[str, Any]] | None:
        if not result.exists() and Path(f"{result}.pending").exists():
            with contextlib.suppress(StageError, OSError, ValueError):
                commit_outputs(result)  # roll a half-done publication forward
        if not result.exists() and Path(f"{result}.exit").exists():
            complete_after_loss(spec())  # its commands finished; do the post-job it missed
        return self.outputs(result)
