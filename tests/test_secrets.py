"""Secrets in the environment never reach anything batchprod writes or serves.

The demo runs in a subprocess whose environment holds secrets under names no deny-list would guess;
then every file of the demo directory (except the payload's own stdout/stderr), the CLI's reports and
provenance exports (JSON and PROV-JSON), and every API response are searched for the secret values.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from batchprod.service.app import create_app
from batchprod.state.run import Run


def _secrets() -> dict[str, str]:
    """Differently named and shaped secrets, with random parts (so a hit is no coincidence)."""
    r = secrets.token_hex(6)
    return {
        "DATABASE_URL": f"postgresql://batch:pw{r}hunter2@db.example:5432/prod",
        "GITHUB_PAT": "ghp_" + secrets.token_hex(18),
        "MY_SERVICE_TOKEN": f"svc-{r}-tok",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/" + secrets.token_urlsafe(12),
        "SOME_VAR": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0." + secrets.token_urlsafe(16),
        # a secret inside a variable whose value is recorded (allow-listed name)
        "BATCHPROD_NOTE": f"mirror at https://ci:inurl{r}@git.example/x",
    }


def _needles(values: dict[str, str]) -> dict[str, bytes]:
    """What must not appear: each whole value, and its random part alone (survives JSON escaping)."""
    out = {k: v.encode() for k, v in values.items() if k != "BATCHPROD_NOTE"}
    out["BATCHPROD_NOTE"] = values["BATCHPROD_NOTE"].split("//")[1].split("@")[0].encode()  # ci:inurl...
    for k, v in values.items():
        part = max(v.replace("/", ".").replace(":", ".").replace("@", ".").split("."), key=len)
        out[f"{k} (part)"] = part.encode()
    return out


def _hits(data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [k for k, n in needles.items() if n in data]


def test_no_secret_is_written_or_served(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    values = _secrets()
    needles = _needles(values)
    for k, v in values.items():
        monkeypatch.setenv(k, v)  # the in-process CLI and API below see them too
    demo = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-m", "batchprod.cli", "demo", str(demo), "--visits", "2",
                           "--detectors", "2", "--sources", "5"], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, timeout=240)
    assert proc.returncode in (0, 1), proc.stderr.decode()[-2000:]  # 1: the tiny survey's catalog check
    (sd,) = [p.parent for p in (demo / "submit").rglob("state.db")]
    run = Run(sd)
    assert {j["status"] for j in run.store.jobs()} == {"SUCCEEDED"}
    leaks: dict[str, list[str]] = {}

    def check(what: str, data: bytes | str) -> None:
        hits = _hits(data.encode() if isinstance(data, str) else data, needles)
        if hits:
            leaks[what] = hits

    check("demo stdout/stderr", proc.stdout + proc.stderr)

    # every file batchprod wrote (state.db and its WAL, graph, workflow, config, job results, usage, ...)
    files = [p for p in demo.rglob("*") if p.is_file()
             and not (p.parent.parent.name == "logs" and p.suffix in (".out", ".err"))]
    assert any(p.name == "state.db" for p in files) and any(p.suffix == ".bpqg" for p in files)
    for p in files:
        check(str(p.relative_to(tmp_path)), p.read_bytes())

    # the CLI's reports and provenance records, in every format
    outputs = run.store.outputs()
    assert outputs
    texts = {"report --json": cli("report", sd, "--json").output,
             "report --failures --json": cli("report", sd, "--failures", "--json").output}
    for job in ("calibrate_visit1_detector0", "finalJob"):
        texts[f"report --job {job}"] = cli("report", sd, "--job", job, "--json").output
    for o in {o["dataset_type"]: o for o in outputs}.values():
        for fmt in ("--json", "--prov", None):
            r = cli("provenance", sd, o["path"], *([fmt] if fmt else []))
            assert r.exit_code == 0, r.output
            texts[f"provenance {o['dataset_type']} {fmt}"] = r.output
    for what, text in texts.items():
        check(what, text)

    # every API response
    client = TestClient(create_app(demo / "submit"))
    name = str(sd.relative_to(demo / "submit"))
    urls = ["/", "/api/runs", f"/api/runs/{name}", f"/api/runs/{name}/failures"]
    urls += [f"/api/runs/{name}/jobs/{j['name']}" for j in run.store.jobs()]
    urls += [f"/api/runs/{name}/provenance?dataset={o['path']}" for o in outputs]
    urls += [f"/api/runs/{name}/provenance?dataset={o['path']}&lineage=up" for o in outputs if o["node_id"] != "finalJob"]
    for url in urls:
        resp = client.get(url)
        assert resp.status_code == 200, (url, resp.text)
        check(f"GET {url}", resp.content)

    print(f"\nsearched {len(files)} files, {len(texts)} CLI outputs and {len(urls)} API responses "
          f"for {len(values)} secrets: {sum(map(len, leaks.values()))} hits")
    assert not leaks, leaks

    # not vacuous: the environment was captured, secrets by name only, the allowed value scrubbed
    rec = json.loads(cli("provenance", sd, outputs[0]["path"], "--json").output)["context"]
    assert set(values) - {"BATCHPROD_NOTE"} <= set(rec["env_names"])
    assert rec["env"]["BATCHPROD_NOTE"] == "mirror at https://<redacted>@git.example/x"
