"""Test helpers shipped with the package (so every test suite and backend conformance test shares
them): a tiny data repository of text files and pipelines made of shell commands.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from batchprod.execution.rundir import REGISTRY_FILE
from batchprod.graph.registry import Registry


def make_toy_repo(
    root: str | Path,
    visits: Iterable[int] = (1, 2),
    detectors: Iterable[int] = (0, 1),
    overlaps: Mapping[tuple[int, int], Iterable[int]] | None = None,
    tract: int = 0,
) -> Path:
    """A repo with one text 'raw' per (visit, detector) and (visit, detector) -> (tract, patch) relations.

    ``overlaps`` maps (visit, detector) to the patches it overlaps; by default detector d overlaps patch d.
    """
    repo = Path(root)
    (repo / "raw").mkdir(parents=True, exist_ok=True)
    reg = Registry(repo / REGISTRY_FILE, create=True)
    reg.register_dataset_type("raw", ["visit", "detector"])
    rows, rels = [], []
    for v in visits:
        for d in detectors:
            rel = f"raw/raw_{v}_{d}.txt"
            (repo / rel).write_text(f"raw visit={v} detector={d}\n")
            rows.append(({"visit": v, "detector": d}, rel, None, None))
            patches = (overlaps or {}).get((v, d), [d]) if overlaps is not None else [d]
            rels.extend(({"visit": v, "detector": d}, {"tract": tract, "patch": p}) for p in patches)
    reg.insert_datasets("raw", "raw", rows)
    reg.insert_relations(["visit", "detector"], ["tract", "patch"], rels)
    reg.close()
    return repo


def command_task(dims: list[str], inputs: list[str], outputs: list[str], command: str | None = None) -> dict[str, Any]:
    """A pipeline task that concatenates its inputs into each output (or runs ``command``)."""
    if command is None:
        command = " && ".join(f"cat {{inputs.{inputs[0]}}} > {{outputs.{o}}} && echo {{label}} {{dataId}} >> {{outputs.{o}}}" for o in outputs)
    return {"command": command, "dimensions": dims, "inputs": inputs, "outputs": outputs}


TOY_PIPELINE: dict[str, Any] = {
    "tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"]),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"]),
    }
}


def write_submit(
    directory: str | Path,
    pipeline: Mapping[str, Any] | None = None,
    repo: str | Path = "repo",
    **keys: Any,
) -> Path:
    """Write pipeline.yaml and submit.yaml into a directory; extra keyword args become top-level keys."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pipeline.yaml").write_text(yaml.safe_dump(dict(pipeline or TOY_PIPELINE), sort_keys=False))
    cfg: dict[str, Any] = {
        "pipelineYaml": "pipeline.yaml",
        "payload": {"payloadName": "toy", "repo": str(repo), "outputRun": "toy/run"},
        "submitPath": str(d / "submit" / "{outputRun}"),
        "requestMemory": 100,
    }
    for k, v in keys.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = d / "submit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- payloads with controlled misbehaviour (importable by the job runner) ------------------------------
def alloc_task(ctx: Any) -> None:
    """Allocate and touch ``config.mb`` MB (or ``config.mb_by_attempt[attempt]``), hold it, then write."""
    import time

    mb = int(ctx.config.get("mb", 10))
    buf = bytearray(mb * 2**20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    time.sleep(float(ctx.config.get("hold", 1.0)))
    for ref in ctx.outputs.values():
        ref.path.write_text(f"{ctx.label} {ctx.data_id} attempt {os.environ.get('BATCHPROD_ATTEMPT')}\n")


def memory_error_task(ctx: Any) -> None:
    raise MemoryError("cannot allocate the coadd buffer")


def abort_task(ctx: Any) -> None:

    os.abort()


def chained_error_task(ctx: Any) -> None:
    """Fails with a chained traceback: the cause (KeyError) is printed first."""
    try:
        {}["calib_dir"]
    except KeyError as exc:
        raise RuntimeError("task setup failed") from exc


# -- driving an orchestrator from outside ----------------------------------------------------------------
def start_orchestrator(submit_dir: str | Path, log: str | Path | None = None) -> Any:
    """Run a prepared run's orchestrator as its own process (as ``submit --detach`` does)."""
    import subprocess
    import sys

    out = open(log or Path(submit_dir) / "orchestrator.log", "ab")  # noqa: SIM115 (child owns it)
    try:
        return subprocess.Popen([sys.executable, "-m", "batchprod.cli", "_execute", str(submit_dir)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def wait_for(pred: Any, timeout: float = 30.0, interval: float = 0.02) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError("condition not reached in time")


# -- crash safety: kill the orchestrator at random points and restart ----------------------------------
def chaos_pipeline(executions_log: str | Path, sleep: float = 0.1) -> dict[str, Any]:
    """Deterministic outputs (concatenations of inputs); each finished payload logs 'job attempt'."""
    log = f"echo \"$BATCHPROD_JOB $BATCHPROD_ATTEMPT\" >> {executions_log}"
    cal = f"sleep {sleep}; cat {{inputs.raw}} > {{outputs.calexp}}; echo calibrate {{dataId}} >> {{outputs.calexp}}; {log}"
    co = f"sleep {sleep}; cat {{inputs.calexp}} > {{outputs.coadd}}; echo coadd {{dataId}} >> {{outputs.coadd}}; {log}"
    return {"tasks": {
        "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"], cal),
        "coadd": command_task(["tract", "patch"], ["calexp"], ["coadd"], co),
    }}


def _prepare_chaos(workdir: Path, cores: int) -> Any:
    from batchprod.engine.prepare import prepare

    repo = make_toy_repo(workdir / "repo", visits=(1, 2, 3), detectors=(0, 1, 2))
    cfg = write_submit(workdir, chaos_pipeline(workdir / "executions.log"), repo=repo, site={"local": {"cores": cores}},
                       finalJob={"command": f"cat {repo}/toy/run/coadd/* > {repo}/toy/run/final.txt", "whenRun": "SUCCESS"})
    return prepare(cfg)


def published_outputs(repo: Path) -> dict[str, str]:
    """Relative path -> checksum of every published file of the toy run (staging excluded)."""
    from batchprod.execution.protocol import file_checksum

    root = repo / "toy" / "run"
    return {str(p.relative_to(root)): file_checksum(p) for p in sorted(root.rglob("*"))
            if p.is_file() and "_staging" not in p.parts}


def reference_outputs(workdir: str | Path, cores: int = 2) -> dict[str, str]:
    """Outputs of an uninterrupted run."""
    from batchprod.engine.control import LocalExecutor

    workdir = Path(workdir)
    run = _prepare_chaos(workdir, cores)
    state = LocalExecutor(run).execute()
    if state != "SUCCEEDED":
        raise RuntimeError(f"reference run ended {state}")
    return published_outputs(workdir / "repo")


def _wait_any(procs: list[Any], timeout: float) -> int | None:
    """Wait up to ``timeout`` s for an engine that ended other than refused; its exit code, or None."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        done = [c for c in codes if c is not None and c != 2]
        if done:
            return done[0]
        if all(c is not None for c in codes) or time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def chaos_trial(workdir: str | Path, reference: dict[str, str], seed: int, kills: int = 3, cores: int = 2,
                max_delay: float = 2.0, racers: int = 1) -> dict[str, Any]:
    """Run with ``kills`` SIGKILLs of the orchestrator at random moments (every other one also kills
    every job process, like a reboot), restarting each time; then check outputs and the store.
    ``racers`` > 1 starts that many engines at every (re)start: all but one must be refused."""
    import random
    import signal as sig

    from batchprod.execution.process import kill_group_of, processes_with_env
    from batchprod.execution.states import JobState
    from batchprod.wms.local.backend import ENV_SUBMIT_DIR

    rnd = random.Random(seed)
    workdir = Path(workdir)
    run = _prepare_chaos(workdir, cores)
    restarts = 0
    refused = 0
    for k in range(kills + 50):
        # ``racers`` engines at once: the run lock lets one drive, the others exit 2 (the kill below
        # may also land while they are still racing for it)
        procs = [start_orchestrator(run.submit_dir) for _ in range(racers)]
        if k >= kills:
            rc = _wait_any(procs, 120)
            for p in procs:
                p.wait(120)
            refused += sum(p.returncode == 2 for p in procs)
            if rc in (0, 1):
                break
            continue
        if _wait_any(procs, rnd.uniform(0.0, max_delay)) is not None:
            for p in procs:
                p.wait(120)
            refused += sum(p.returncode == 2 for p in procs)
            break  # it finished before the kill
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig.SIGKILL)
            p.wait()
        refused += sum(p.returncode == 2 for p in procs)
        if k % 2 == 1:  # reboot-like: every job process is lost too
            for pid in processes_with_env(ENV_SUBMIT_DIR, str(run.submit_dir)):
                kill_group_of(pid, sig.SIGKILL)
        restarts += 1

    store = run.store
    got = published_outputs(workdir / "repo")
    lost = sum(1 for p, ck in reference.items() if got.get(p) != ck)
    outs = store.outputs()
    per_path: dict[str, int] = {}
    for o in outs:
        per_path[o["path"]] = per_path.get(o["path"], 0) + 1
    duplicated = sum(c - 1 for c in per_path.values() if c > 1)
    inconsistent = []
    jobs = store.jobs()
    atts = store.attempts()
    by_job: dict[int, list[dict[str, Any]]] = {}
    for a in atts:
        by_job.setdefault(a["job_id"], []).append(a)
    if store.run_info()["status"] != "SUCCEEDED":
        inconsistent.append(f"run status {store.run_info()['status']}")
    for j in jobs:
        mine = by_job.get(j["id"], [])
        if j["status"] != JobState.SUCCEEDED:
            inconsistent.append(f"{j['name']}: {j['status']}")
        if not mine or mine[-1]["number"] != j["attempts"] or mine[-1]["status"] != JobState.SUCCEEDED:
            inconsistent.append(f"{j['name']}: last attempt does not match the job")
        if sum(a["status"] == JobState.SUCCEEDED for a in mine) != 1:
            inconsistent.append(f"{j['name']}: {sum(a['status'] == JobState.SUCCEEDED for a in mine)} successes")
        if any(a["status"] in (JobState.RUNNING, JobState.QUEUED) for a in mine):
            inconsistent.append(f"{j['name']}: attempt left RUNNING/QUEUED")
    # no succeeded job ran again: no payload finished with an attempt after the successful one
    ran_twice = 0
    success_attempt = {j["name"]: j["attempts"] for j in jobs}
    log = workdir / "executions.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        name, attempt = line.split()
        if int(attempt) > success_attempt.get(name, 1 << 30):
            ran_twice += 1
    return {"restarts": restarts, "refused": refused, "lost": lost, "duplicated": duplicated + ran_twice,
            "inconsistent": len(inconsistent), "problems": inconsistent[:5],
            "attempts": len(atts), "jobs": len(jobs)}


def shell_launch(run_dir: str | Path, job: int, command: str = "true") -> Any:
    """One attempt of a shell-command job of the run in ``run_dir``, for driving a backend directly
    (no engine, no prepared run): logs under ``run_dir/logs/calibrate``."""
    from batchprod.wms.base import Launch

    run_dir = Path(run_dir)
    name = f"calibrate_visit{job}"
    logs = run_dir / "logs" / "calibrate"
    logs.mkdir(parents=True, exist_ok=True)
    result = logs / f"{name}.1.result.json"
    spec = {"name": name, "attempt": 1, "repo": str(run_dir / "repo"), "output_run": "run", "result_path": str(result),
            "quanta": [{"label": "calibrate", "data_id": {"visit": job}, "node_id": name, "command": command,
                        "python": None, "config": {}, "inputs": [], "outputs": []}]}
    return Launch(job, name, "calibrate", 1, 1, 100, 0, spec, logs / f"{name}.1.out", logs / f"{name}.1.err", result,
                  run=str(run_dir))


def drain_ends(backend: Any, n: int, timeout: float = 60.0, interval: float = 0.05) -> list[Any]:
    """Poll a backend until ``n`` attempts ended (TimeoutError after ``timeout`` seconds)."""
    out: list[Any] = []

    def more() -> bool:
        out.extend(backend.poll())
        return len(out) >= n

    wait_for(more, timeout=timeout, interval=interval)
    return out


# -- the dev Slurm cluster (scripts/dev-slurm.sh) -------------------------------------------------------
SLURM_CONF = os.environ.get("SLURM_CONF", "/tmp/slurm-ci/slurm.conf")


def slurm_up() -> bool:
    """The dev cluster answers and its nodes can take jobs."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None or not os.path.exists(SLURM_CONF):
        return False
    env = dict(os.environ, SLURM_CONF=SLURM_CONF)
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env, timeout=20)
    states = p.stdout.split()
    return p.returncode == 0 and bool(states) and all(st.rstrip("*~#!%$@^-").startswith(("idle", "mix", "alloc", "comp"))
                                                      for st in states)


def use_slurm(monkeypatch: Any) -> str:
    """For a test fixture: the dev cluster's config, selected through $SLURM_CONF; without a cluster
    the test is skipped, or fails under $BATCHPROD_REQUIRE_ENGINES=1 (CI)."""
    import pytest

    if not slurm_up():
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail("Slurm is required here (BATCHPROD_REQUIRE_ENGINES=1) but does not answer")
        pytest.skip("no Slurm cluster (start one with scripts/dev-slurm.sh up)")
    monkeypatch.setenv("SLURM_CONF", SLURM_CONF)
    return SLURM_CONF


def dead_slurm_conf(directory: str | Path) -> str:
    """The dev cluster's config with the controller on a port nobody listens on: what clients see when
    the controller is gone (nothing shared is stopped). Returns its path."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now; nobody listens once closed
    lines = [ln for ln in Path(SLURM_CONF).read_text().splitlines()
             if not ln.startswith(("SlurmctldPort=", "MessageTimeout="))]
    conf = Path(directory) / "dead" / "slurm.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("\n".join([*lines, f"SlurmctldPort={port}", "MessageTimeout=2"]) + "\n")
    return str(conf)
