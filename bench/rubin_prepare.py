"""From a real Rubin quantum graph (.qg) to a prepared workflow: batchprod next to ``bps prepare``.

Each tool prepares the same graph with the same clustering (per (visit, detector) chain of t1..t5
in one job, the per-visit gather alone), into a fresh submit directory, several times; printed per
tool: median wall time, peak RSS (the largest single process, as /usr/bin/time reports it, and the
whole process tree sampled every 20 ms), jobs, files in the submit directory.

    python bench/rubin_prepare.py --make /tmp/rp --visits 594 --detectors 20      # 59,994 quanta (slow: puts)
    python bench/rubin_prepare.py --dir /tmp/rp --runs 3 [--bps /path/to/venv-with-ctrl_bps-htcondor]

Needs ``batchprod[rubin]``; the peer needs a venv with lsst-ctrl-bps and lsst-ctrl-bps-htcondor
(htcondor < 25). Figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import yaml

CLUSTER = {"vdchain": {"pipetasks": "t1, t2, t3, t4, t5", "dimensions": "visit, detector"}}


def make(root: Path, visits: int, detectors: int) -> None:
    from batchprod.testing_rubin import chain_pipeline, make_qgraph, rubin_repo

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    repo = rubin_repo(root, detectors, visits)
    pipe = chain_pipeline(root / "pipeline.yaml")
    make_qgraph(repo, pipe, root / "g.qg", output_run="u/bench/out/run1")
    print(f"made {root}/g.qg ({visits} visits x {detectors} detectors) in {time.perf_counter() - t0:.0f} s")


def configs(root: Path) -> tuple[Path, Path]:
    """The same ctrl_bps submit file for both tools (bps: its HTCondor plugin; batchprod: local)."""
    base = {"qgraphFile": str(root / "g.qg"), "operator": "bench", "project": "bench", "campaign": "bench",
            "payload": {"payloadName": "bench", "butlerConfig": str(root / "repo"), "inCollection": "inputs",
                        "output": "u/bench/out", "outputRun": "u/bench/out/run1"},
            "clusterAlgorithm": "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering",
            "cluster": CLUSTER}
    ours = root / "batchprod.yaml"
    ours.write_text(yaml.safe_dump({**base, "submitPath": str(root / "submit-bp" / "${BENCH_UNIQ}")}))
    bps = root / "bps.yaml"
    bps.write_text(yaml.safe_dump({**base, "wmsServiceClass": "lsst.ctrl.bps.htcondor.HTCondorService",
                                   "computeSite": "local", "site": {"local": {"profile": {}}},
                                   "submitPath": str(root / "submit-bps" / "${BENCH_UNIQ}")}))
    return ours, bps


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, largest single-process peak RSS MB, peak RSS MB of the whole tree sampled every 20 ms)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree_peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        root = psutil.Process(p.pid)
        while not done.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for q in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += q.memory_info().rss
            tree_peak = max(tree_peak, total / 2**20)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, tree_peak


def files_and_jobs(submit: Path, tool: str) -> tuple[int, int]:
    files = sum(len(f) for _, _, f in os.walk(submit))
    if tool == "batchprod":
        from batchprod.state.run import Run

        run = Run(submit)
        return files, len(run.workflow) + (run.workflow.final is not None)
    dag = next(submit.rglob("*.dag"), None)
    jobs = sum(1 for ln in dag.read_text().splitlines() if ln.startswith(("JOB ", "FINAL "))) if dag else 0
    return files, jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make", type=Path, help="build a repo, pipeline and graph here")
    ap.add_argument("--visits", type=int, default=99)
    ap.add_argument("--detectors", type=int, default=20)
    ap.add_argument("--dir", type=Path, help="a directory made by --make (repo/, g.qg)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bps", type=Path, help="a venv with lsst-ctrl-bps and its HTCondor plugin")
    a = ap.parse_args()
    if a.make:
        make(a.make, a.visits, a.detectors)
        return
    if not a.dir:
        ap.error("give --make DIR or --dir DIR")
    ours, bps = configs(a.dir)
    tools = {"batchprod": ([str(Path(sys.executable).parent / "batchprod"), "prepare", str(ours)], {})}
    if a.bps:
        tools["bps prepare"] = ([str(a.bps / "bin" / "bps"), "prepare", str(bps)],
                                {"CTRL_MPEXEC_DIR": str(a.bps), "DAF_BUTLER_DIR": str(a.bps)})
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in tools}
    counts: dict[str, tuple[int, int]] = {}
    for i in range(a.runs):  # interleaved: the machine's noise falls on both alike
        for tool, (cmd, extra) in tools.items():
            uniq = f"{tool.split()[0]}-{i}-{uuid.uuid4().hex[:6]}"
            results[tool].append(measure(cmd, {**os.environ, **extra, "BENCH_UNIQ": uniq}))
            sub = a.dir / ("submit-bp" if tool == "batchprod" else "submit-bps") / uniq
            counts[tool] = files_and_jobs(sub, tool)
            shutil.rmtree(sub, ignore_errors=True)
    from batchprod.graph.rubin import read_rubin_qgraph

    n = len(read_rubin_qgraph(a.dir / "g.qg"))
    print(f"graph {a.dir / 'g.qg'}: {n:,} quanta; {a.runs} runs each, medians")
    print(f"{'tool':<12} {'wall s':>8} {'peak MB':>8} {'tree MB':>8} {'files':>7} {'jobs':>7}")
    med = {t: [statistics.median(x[k] for x in r) for k in range(3)] for t, r in results.items()}
    for t, (w, m, tree) in med.items():
        print(f"{t:<12} {w:8.2f} {m:8.0f} {tree:8.0f} {counts[t][0]:>7,} {counts[t][1]:>7,}")
    if "bps prepare" in med:
        b, o = med["bps prepare"], med["batchprod"]
        print(f"batchprod vs bps prepare: {b[0] / o[0]:.1f}x faster, {b[1] / o[1]:.1f}x less memory "
              f"(single process), {b[2] / o[2]:.1f}x (process tree)")


if __name__ == "__main__":
    main()
